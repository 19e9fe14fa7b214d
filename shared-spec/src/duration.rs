//! Durations as written in specs: `500ms`, `45s`, `30m`, `2h`, `90d`.

use std::fmt;

/// A non-negative span of time with millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    ms: i64,
}

/// Milliseconds in one second, minute, hour and day.
pub const SECOND_MS: i64 = 1_000;
/// Milliseconds in one minute.
pub const MINUTE_MS: i64 = 60 * SECOND_MS;
/// Milliseconds in one hour.
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
/// Milliseconds in one day.
pub const DAY_MS: i64 = 24 * HOUR_MS;

const UNITS: [(&str, i64); 5] = [
    ("d", DAY_MS),
    ("h", HOUR_MS),
    ("m", MINUTE_MS),
    ("s", SECOND_MS),
    ("ms", 1),
];

impl Duration {
    /// A duration of `ms` milliseconds.
    pub const fn from_ms(ms: i64) -> Self {
        Self { ms }
    }

    /// The duration in milliseconds.
    pub const fn as_ms(self) -> i64 {
        self.ms
    }

    /// True for a zero duration.
    pub const fn is_zero(&self) -> bool {
        self.ms == 0
    }

    /// Parses `<integer><unit>` with unit one of `ms`, `s`, `m`, `h`, `d`.
    /// Returns a sentence fit for an error message when the text is not a duration.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(digits_end);
        if digits.is_empty() {
            return Err(format!(
                "`{text}` is not a duration: write a whole number and a unit, such as `30m`, `2h` or `90d`"
            ));
        }
        let factor = UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                format!(
                    "`{text}` has unknown unit `{unit}`: use one of ms, s, m, h, d (for example `30m`)"
                )
            })?;
        let n: i64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is too large for a duration"))?;
        n.checked_mul(factor)
            .map(Self::from_ms)
            .ok_or_else(|| format!("`{text}` is too large for a duration"))
    }

    /// True when `other` divides this duration into whole parts.
    pub fn is_multiple_of(self, other: Duration) -> bool {
        other.ms > 0 && self.ms % other.ms == 0
    }
}

impl serde::Serialize for Duration {
    /// Serializes as the display form (`90d`).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Duration {
    /// Prints the largest unit that represents the duration exactly (`90d`, `36h`, `1500ms`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ms == 0 {
            return f.write_str("0s");
        }
        for (unit, factor) in UNITS {
            if self.ms % factor == 0 {
                return write!(f, "{}{unit}", self.ms / factor);
            }
        }
        unreachable!("every duration is a whole number of milliseconds")
    }
}

/// Rounds `t` up to a multiple of `r` (unchanged if it already is one); `r > 0`.
pub fn ceil_to(t: i64, r: i64) -> i64 {
    let m = t.rem_euclid(r);
    if m == 0 { t } else { t - m + r }
}

/// Rounds `t` down to a multiple of `r`; `r > 0`.
pub fn floor_to(t: i64, r: i64) -> i64 {
    t - t.rem_euclid(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (text, ms) in [
            ("500ms", 500),
            ("45s", 45_000),
            ("30m", 1_800_000),
            ("2h", 7_200_000),
            ("90d", 90 * DAY_MS),
        ] {
            let d = Duration::parse(text).unwrap();
            assert_eq!(d.as_ms(), ms);
            assert_eq!(d.to_string(), text);
        }
        assert_eq!(Duration::from_ms(36 * HOUR_MS).to_string(), "36h");
        assert_eq!(Duration::from_ms(90 * MINUTE_MS).to_string(), "90m");
    }

    #[test]
    fn refuses_bad_text() {
        assert!(Duration::parse("h").unwrap_err().contains("whole number"));
        assert!(
            Duration::parse("3w")
                .unwrap_err()
                .contains("unknown unit `w`")
        );
        assert!(Duration::parse("1.5h").is_err());
        assert!(Duration::parse("99999999999999999999d").is_err());
    }

    #[test]
    fn rounds_to_resolution() {
        assert_eq!(ceil_to(0, 60), 0);
        assert_eq!(ceil_to(1, 60), 60);
        assert_eq!(ceil_to(60, 60), 60);
        assert_eq!(ceil_to(-1, 60), 0);
        assert_eq!(ceil_to(-61, 60), -60);
        assert_eq!(floor_to(-1, 60), -60);
        assert_eq!(floor_to(119, 60), 60);
    }
}
