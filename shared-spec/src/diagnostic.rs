//! Errors that point into a spec file: `file:line:col: what is wrong and how to fix it`.

use std::fmt;
use std::ops::Range;

/// One problem found in a spec, at a position in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file's name as given to the parser.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong, and how to fix it.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem found in a spec, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<Diagnostic>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl SpecErrors {
    /// The first problem (there is always at least one).
    pub fn first(&self) -> &Diagnostic {
        &self.0[0]
    }
}

/// Collects diagnostics against one source text.
pub(crate) struct Reporter<'a> {
    file: &'a str,
    text: &'a str,
    pub(crate) found: Vec<Diagnostic>,
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(file: &'a str, text: &'a str) -> Self {
        Self {
            file,
            text,
            found: Vec::new(),
        }
    }

    pub(crate) fn text(&self) -> &str {
        self.text
    }

    /// Records `message` at the start of `span`.
    pub(crate) fn at(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.at_offset(span.start, message);
    }

    pub(crate) fn at_offset(&mut self, offset: usize, message: impl Into<String>) {
        let (line, col) = line_col(self.text, offset);
        self.found.push(Diagnostic {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
        });
    }

    pub(crate) fn into_result<T>(mut self, value: T) -> Result<T, SpecErrors> {
        if self.found.is_empty() {
            Ok(value)
        } else {
            self.found.sort_by_key(|d| (d.line, d.col));
            Err(SpecErrors(self.found))
        }
    }
}

/// 1-based line and character column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The closest of `candidates` to `word`, when it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 3));
    }

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("windw", &["window", "where"]), Some("window"));
        assert_eq!(did_you_mean("zzzzzz", &["window", "where"]), None);
    }
}
