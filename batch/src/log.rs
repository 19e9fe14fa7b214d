//! The offline event log: listing its files (a file, a directory/prefix or a glob), and reading
//! Parquet and JSON lines into validated Arrow batches, with invalid records counted and kept.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use duet_spec::event::{DeadLetter, InvalidCounts, JsonLinesDecoder, normalize_batch};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::store::{Location, resolve};
use crate::{Error, Result};

/// One input file of the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputFile {
    /// Where it is, as a URL-like name.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The valid events of a log (not yet deduplicated), with what was rejected.
#[derive(Debug, Default)]
pub struct EventLog {
    /// Valid events in the event schema, in file order.
    pub batches: Vec<RecordBatch>,
    /// The files read, in order.
    pub files: Vec<InputFile>,
    /// Invalid records by reason.
    pub invalid: InvalidCounts,
    /// Invalid records with their original text.
    pub dead_letters: Vec<DeadLetter>,
    /// Number of valid records (duplicates included).
    pub valid: u64,
}

impl EventLog {
    fn absorb(&mut self, part: EventLog) {
        self.batches.extend(part.batches);
        self.files.extend(part.files);
        self.invalid.merge(&part.invalid);
        self.dead_letters.extend(part.dead_letters);
        self.valid += part.valid;
    }
}

/// The format of a log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Parquet,
    JsonLines,
    GzipJsonLines,
}

/// The format of a log file from its path relative to the log's root: files and directories
/// whose names start with `_` or `.` (markers, archive bookkeeping, hidden files) are not events.
fn format_of(path: &str) -> Option<Format> {
    if path
        .split('/')
        .any(|seg| seg.starts_with('.') || seg.starts_with('_'))
    {
        return None;
    }
    let name = path.rsplit('/').next().unwrap_or(path);
    if name.ends_with(".parquet") || name.ends_with(".pq") {
        Some(Format::Parquet)
    } else if [".jsonl.gz", ".json.gz", ".ndjson.gz"]
        .iter()
        .any(|x| name.ends_with(x))
    {
        Some(Format::GzipJsonLines)
    } else if name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".ndjson") {
        Some(Format::JsonLines)
    } else {
        None
    }
}

/// Lists the log's files: `url` is a file, a directory/prefix (searched recursively for
/// `.parquet`, `.jsonl`, `.json` and `.ndjson` files, the latter three optionally gzipped) or a glob (`*`, `?`, `**`).
pub async fn list_files(url: &str) -> Result<(Location, Vec<ObjectMeta>)> {
    let glob_at = url.find(['*', '?', '[']);
    let (base_url, pattern) = match glob_at {
        Some(i) => {
            let cut = url[..i].rfind('/').map_or(0, |j| j + 1);
            (
                url[..cut].trim_end_matches('/').to_string(),
                Some(url[cut..].to_string()),
            )
        }
        None => (url.to_string(), None),
    };
    let loc = resolve(if base_url.is_empty() { "." } else { &base_url })?;
    if pattern.is_none()
        && let Ok(meta) = loc.store.head(&loc.prefix).await
    {
        return Ok((loc, vec![meta]));
    }
    let listed: Vec<ObjectMeta> = loc
        .store
        .list(Some(&loc.prefix))
        .try_collect()
        .await
        .map_err(|e| Error::Storage(format!("cannot list {}: {e}", loc.url)))?;
    let prefix_len = loc.prefix.as_ref().len();
    let mut files: Vec<ObjectMeta> = listed
        .into_iter()
        .filter(|m| {
            let rel = m.location.as_ref()[prefix_len..].trim_start_matches('/');
            match &pattern {
                Some(p) => glob_match(p, rel) && format_of(rel).is_some(),
                None => format_of(rel).is_some(),
            }
        })
        .collect();
    files.sort_by(|a, b| a.location.cmp(&b.location));
    if files.is_empty() {
        return Err(Error::BadInput(format!(
            "events `{url}`: no event files found (expected .parquet, .jsonl, .json or .ndjson files at that path)"
        )));
    }
    Ok((loc, files))
}

/// `*` matches within one path segment, `**` across segments, `?` one character.
fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                let rest = p[2..].strip_prefix(b"/").unwrap_or(&p[2..]);
                (0..=t.len()).any(|i| go(rest, &t[i..]))
            }
            Some(b'*') => (0..=t.len())
                .take_while(|&i| i == 0 || t[i - 1] != b'/')
                .any(|i| go(&p[1..], &t[i..])),
            Some(b'?') => !t.is_empty() && t[0] != b'/' && go(&p[1..], &t[1..]),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

/// Reads every file of the log at `url`.
pub async fn read_event_log(url: &str) -> Result<EventLog> {
    let (loc, files) = list_files(url).await?;
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let parts: Vec<EventLog> = futures::stream::iter(files)
        .map(|meta| {
            let loc = loc.clone();
            async move { read_file(&loc, &meta).await }
        })
        .buffered(parallel)
        .try_collect()
        .await?;
    let mut log = EventLog::default();
    for p in parts {
        log.absorb(p);
    }
    Ok(log)
}

async fn read_file(loc: &Location, meta: &ObjectMeta) -> Result<EventLog> {
    let name = loc.display(&meta.location);
    let file_name = meta
        .location
        .as_ref()
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let format = match format_of(file_name) {
        Some(f) => f,
        None => sniff(&loc.store, &meta.location, &name).await?,
    };
    let mut log = match format {
        Format::Parquet => read_parquet(loc.store.clone(), meta, &name).await?,
        Format::JsonLines => read_json_lines(&loc.store, &meta.location, &name, false).await?,
        Format::GzipJsonLines => read_json_lines(&loc.store, &meta.location, &name, true).await?,
    };
    log.files.push(InputFile {
        path: name,
        size: meta.size,
    });
    Ok(log)
}

async fn sniff(store: &Arc<dyn ObjectStore>, path: &Path, name: &str) -> Result<Format> {
    let head = store
        .get_range(path, 0..4)
        .await
        .map_err(|e| Error::Storage(format!("cannot read {name}: {e}")))?;
    Ok(if head.as_ref() == b"PAR1" {
        Format::Parquet
    } else {
        Format::JsonLines
    })
}

async fn read_parquet(
    store: Arc<dyn ObjectStore>,
    meta: &ObjectMeta,
    name: &str,
) -> Result<EventLog> {
    let bytes = store
        .get(&meta.location)
        .await
        .map_err(|e| Error::Storage(format!("cannot read {name}: {e}")))?
        .bytes()
        .await
        .map_err(|e| Error::Storage(format!("cannot read {name}: {e}")))?;
    let name = name.to_string();
    tokio::task::spawn_blocking(move || decode_parquet(bytes, &name))
        .await
        .map_err(|e| Error::Internal(format!("Parquet decoding task failed: {e}")))?
}

/// Decodes a Parquet file of events, validating every row; row groups are decoded on every
/// core and kept in file order.
pub fn decode_parquet(bytes: bytes::Bytes, name: &str) -> Result<EventLog> {
    let corrupt = |e: parquet::errors::ParquetError| {
        Error::BadInput(format!("{name}: not a readable Parquet file: {e}"))
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).map_err(corrupt)?;
    let groups: Vec<(usize, u64)> = {
        let md = builder.metadata();
        let mut first_row = 1u64;
        (0..md.num_row_groups())
            .map(|g| {
                let at = first_row;
                first_row += md.row_group(g).num_rows() as u64;
                (g, at)
            })
            .collect()
    };
    let cores = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(1);
    let chunks: Vec<Vec<(usize, u64)>> = (0..cores)
        .map(|c| groups.iter().copied().skip(c).step_by(cores).collect())
        .collect();
    let decoded: Vec<Result<Vec<(usize, EventLog)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|mine| {
                let bytes = bytes.clone();
                scope.spawn(move || -> Result<Vec<(usize, EventLog)>> {
                    let mut out = Vec::new();
                    for &(g, first_row) in mine {
                        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
                            .map_err(corrupt)?
                            .with_row_groups(vec![g])
                            .with_batch_size(64 * 1024)
                            .build()
                            .map_err(corrupt)?;
                        let mut log = EventLog::default();
                        let mut row = first_row;
                        for batch in reader {
                            let batch = batch.map_err(|e| {
                                Error::BadInput(format!("{name}: not a readable Parquet file: {e}"))
                            })?;
                            let n = normalize_batch(&batch, name, row).map_err(Error::BadInput)?;
                            row += batch.num_rows() as u64;
                            log.valid += n.batch.num_rows() as u64;
                            log.invalid.merge(&n.invalid);
                            log.dead_letters.extend(n.dead_letters);
                            if n.batch.num_rows() > 0 {
                                log.batches.push(n.batch);
                            }
                        }
                        out.push((g, log));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("decoder threads do not panic"))
            .collect()
    });
    let mut parts = Vec::new();
    for d in decoded {
        parts.extend(d?);
    }
    parts.sort_by_key(|(g, _)| *g);
    let mut log = EventLog::default();
    for (_, p) in parts {
        log.absorb(p);
    }
    Ok(log)
}

async fn read_json_lines(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    name: &str,
    gzip: bool,
) -> Result<EventLog> {
    let bytes = store
        .get(path)
        .await
        .map_err(|e| Error::Storage(format!("cannot read {name}: {e}")))?
        .bytes()
        .await
        .map_err(|e| Error::Storage(format!("cannot read {name}: {e}")))?;
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        if gzip {
            use std::io::Read;
            let mut text = Vec::with_capacity(bytes.len() * 8);
            flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_end(&mut text)
                .map_err(|e| Error::BadInput(format!("{name}: not a readable gzip file: {e}")))?;
            Ok(decode_parallel(&text, &name))
        } else {
            Ok(decode_parallel(&bytes, &name))
        }
    })
    .await
    .map_err(|e| Error::Internal(format!("JSON decoding task failed: {e}")))?
}

/// Decodes JSON lines on every core: the text is cut at line boundaries into one segment per
/// core, and line numbers are carried across segments.
pub fn decode_parallel(bytes: &[u8], name: &str) -> EventLog {
    let parts = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut cuts = vec![0usize];
    for i in 1..parts {
        let target = bytes.len() * i / parts;
        let at = match bytes[target..].iter().position(|&b| b == b'\n') {
            Some(p) => target + p + 1,
            None => bytes.len(),
        };
        if at > *cuts.last().expect("non-empty") {
            cuts.push(at);
        }
    }
    cuts.push(bytes.len());
    cuts.dedup();
    let segments: Vec<&[u8]> = cuts.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
    let mut first_lines = Vec::with_capacity(segments.len());
    let mut line = 0u64;
    for s in &segments {
        first_lines.push(line);
        line += s.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let decoded: Vec<JsonLinesDecoder> = std::thread::scope(|scope| {
        let handles: Vec<_> = segments
            .iter()
            .zip(&first_lines)
            .map(|(seg, first)| {
                scope.spawn(move || {
                    let mut d = JsonLinesDecoder::new(name, 64 * 1024);
                    d.skip_lines(*first);
                    d.decode(seg);
                    d
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("decoder threads do not panic"))
            .collect()
    });
    let mut log = EventLog::default();
    for mut d in decoded {
        log.batches.extend(d.finish());
        log.invalid.merge(&d.invalid);
        log.dead_letters.append(&mut d.dead_letters);
        log.valid += d.valid;
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.parquet", "a.parquet"));
        assert!(!glob_match("*.parquet", "d/a.parquet"));
        assert!(glob_match("**/*.parquet", "d/e/a.parquet"));
        assert!(glob_match("**/*.parquet", "a.parquet"));
        assert!(glob_match("date=2026-11-?/*", "date=2026-11-1/x.jsonl"));
        assert_eq!(format_of("_archive/p0.json"), None);
        assert_eq!(
            format_of("date=2026-11-01/hour=03/p0-00000000000000000012.parquet"),
            Some(Format::Parquet)
        );
        assert_eq!(format_of(".hidden/x.jsonl"), None);
    }

    #[tokio::test]
    async fn reads_json_lines_and_parquet_from_memory() {
        let loc = resolve("memory://log-test/events").unwrap();
        let line = |id: &str, ts: i64| {
            format!(
                "{{\"event_id\":\"{id}\",\"user_id\":\"u\",\"event_type\":\"view\",\"ts\":{ts}}}\n"
            )
        };
        let body = format!("{}garbage\n{}", line("a", 1), line("b", 2));
        loc.store
            .put(&loc.child("day1/part.jsonl"), body.into())
            .await
            .unwrap();
        loc.store
            .put(&loc.child("_SUCCESS"), "".into())
            .await
            .unwrap();
        let log = read_event_log("memory://log-test/events").await.unwrap();
        assert_eq!(log.valid, 2);
        assert_eq!(log.invalid.total(), 1);
        assert_eq!(log.dead_letters[0].position, 2);
        assert_eq!(log.files.len(), 1);
        assert_eq!(
            log.files[0].path,
            "memory://log-test/events/day1/part.jsonl"
        );
        let err = read_event_log("memory://log-test/nothing-here")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("memory://log-test/nothing-here"),
            "{err}"
        );
    }

    #[test]
    fn parallel_decoding_keeps_line_numbers() {
        let mut text = String::new();
        for i in 0..1000 {
            if i % 97 == 0 {
                text.push_str("bad\n");
            } else {
                text.push_str(&format!("{{\"event_id\":\"e{i}\",\"user_id\":\"u\",\"event_type\":\"view\",\"ts\":{i}}}\n"));
            }
        }
        let log = decode_parallel(text.as_bytes(), "f");
        let lines: Vec<u64> = log.dead_letters.iter().map(|d| d.position).collect();
        let expected: Vec<u64> = (0..1000).filter(|i| i % 97 == 0).map(|i| i + 1).collect();
        assert_eq!(lines, expected);
        assert_eq!(log.valid as usize + lines.len(), 1000);
    }
}
