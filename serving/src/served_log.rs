//! The served-feature log: a sample of what the server answered, for the consistency checker.
//!
//! Entities are sampled by a hash of their key, so a sampled entity is always logged. A request
//! hands over only its values ([`Served`]) through a bounded channel (dropped and counted when
//! full, never waited on). A background task builds the records and writes them to the store
//! as JSON-lines files, keeping at most a fixed number of files.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use duet_batch::store::Location;
use duet_spec::Value;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One logged answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServedRecord {
    /// When it was answered (epoch ms).
    pub served_at_ms: i64,
    /// The instant the features were evaluated as of (epoch ms).
    pub as_of_ms: i64,
    /// The entity.
    pub entity: String,
    /// Feature name → value served.
    pub values: BTreeMap<String, Value>,
    /// Batch view → the as-of instant (epoch ms) of the snapshot the values came from.
    #[serde(default)]
    pub snapshots: BTreeMap<String, i64>,
}

/// An answer as a request hands it to the log: what a [`ServedRecord`] is built from. The
/// writer task builds the record (names, maps), so a request only copies its values.
#[derive(Debug, Clone)]
pub struct Served {
    /// When it was answered (epoch ms).
    pub served_at_ms: i64,
    /// The instant the features were evaluated as of (epoch ms).
    pub as_of_ms: i64,
    /// The entity.
    pub entity: String,
    /// The features' names, shared by every answer to the same feature list.
    pub names: Arc<[String]>,
    /// Each feature's value as served, in the order of `names`; `None` where it was not served
    /// (`INVALID`), which the record leaves out.
    pub values: Vec<Option<Value>>,
    /// Every view's name, shared by all answers, indexed by `snapshots`.
    pub views: Arc<[String]>,
    /// Batch view index → the as-of instant (epoch ms) of the snapshot the values came from.
    pub snapshots: Vec<(usize, i64)>,
}

impl From<Served> for ServedRecord {
    fn from(s: Served) -> ServedRecord {
        ServedRecord {
            served_at_ms: s.served_at_ms,
            as_of_ms: s.as_of_ms,
            entity: s.entity,
            values: s
                .names
                .iter()
                .zip(s.values)
                .filter_map(|(n, v)| Some((n.clone(), v?)))
                .collect(),
            snapshots: s
                .snapshots
                .iter()
                .map(|(vi, at)| (s.views[*vi].clone(), *at))
                .collect(),
        }
    }
}

/// Settings of the log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Fraction of entities logged (0..=1).
    pub sample: f64,
    /// Largest number of files kept; the oldest are deleted.
    pub max_files: usize,
    /// How often buffered records are written.
    pub flush_every: Duration,
    /// Records queued at most, and records per file (beyond, new ones are dropped and counted).
    pub capacity: usize,
}

/// The sending side, held by request handlers.
#[derive(Clone)]
pub struct ServedLog {
    tx: mpsc::Sender<Served>,
    sample: f64,
    /// Records lost: dropped because the buffer was full, or in a file the store refused.
    pub dropped: Arc<AtomicU64>,
}

/// Where served logs live in the store.
pub const LOG_DIR: &str = "served_log";

/// True when `entity` is in a sample of fraction `sample`.
pub fn sampled(entity: &str, sample: f64) -> bool {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    entity.hash(&mut h);
    (h.finish() % 1_000_000) < (sample.clamp(0.0, 1.0) * 1_000_000.0) as u64
}

impl ServedLog {
    /// Starts the writer task; it stops (after a last write) when `shutdown` is cancelled.
    pub fn start(
        store: Location,
        config: LogConfig,
        shutdown: CancellationToken,
    ) -> (ServedLog, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        let log = ServedLog {
            tx,
            sample: config.sample,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let task = tokio::spawn(writer(store, config, rx, shutdown, log.dropped.clone()));
        (log, task)
    }

    /// True when this entity is logged.
    pub fn wants(&self, entity: &str) -> bool {
        sampled(entity, self.sample)
    }

    /// Queues an answer without waiting.
    pub fn record(&self, r: Served) {
        if self.tx.try_send(r).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn writer(
    store: Location,
    config: LogConfig,
    mut rx: mpsc::Receiver<Served>,
    shutdown: CancellationToken,
    dropped: Arc<AtomicU64>,
) {
    let mut buf: Vec<ServedRecord> = Vec::new();
    let mut tick = tokio::time::interval(config.flush_every);
    let mut files = Files {
        // Random per process: replicas in containers all run as process 1, and two of them
        // starting a file in the same millisecond must not overwrite each other's.
        id: std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8),
        seq: 0,
        dropped,
    };
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(r) => add(&store, &config, &mut buf, &mut files, r).await,
                None => break,
            },
            _ = tick.tick() => {
                flush(&store, &config, &mut buf, &mut files).await;
            }
            _ = shutdown.cancelled() => break,
        }
    }
    // What is still queued at shutdown is written too, in files of at most `capacity` records.
    while let Ok(r) = rx.try_recv() {
        add(&store, &config, &mut buf, &mut files, r).await;
    }
    flush(&store, &config, &mut buf, &mut files).await;
}

/// Adds an answer to the buffer, and writes the buffer once it holds `capacity` records. At
/// most `capacity` records wait here (and as many in the channel), and no file holds more:
/// memory and disk stay bounded at any request rate.
async fn add(
    store: &Location,
    config: &LogConfig,
    buf: &mut Vec<ServedRecord>,
    files: &mut Files,
    r: Served,
) {
    buf.push(r.into());
    if buf.len() >= config.capacity.max(1) {
        flush(store, config, buf, files).await;
    }
}

/// What the writer needs to name its files and count what it loses.
struct Files {
    /// This process's random id, in every file name.
    id: u64,
    /// Files written so far.
    seq: u64,
    /// Records lost (shared with [`ServedLog::dropped`]).
    dropped: Arc<AtomicU64>,
}

async fn flush(
    store: &Location,
    config: &LogConfig,
    buf: &mut Vec<ServedRecord>,
    files: &mut Files,
) {
    if buf.is_empty() {
        return;
    }
    let first = buf[0].served_at_ms;
    let records = buf.len() as u64;
    let mut text = String::new();
    for r in buf.drain(..) {
        text.push_str(&serde_json::to_string(&r).expect("serializable"));
        text.push('\n');
    }
    files.seq += 1;
    let name = format!(
        "{LOG_DIR}/{first:015}-{}-{:016x}-{:06}.jsonl",
        std::process::id(),
        files.id,
        files.seq
    );
    let path = store.child(&name);
    if let Err(e) = store.store.put(&path, text.into()).await {
        files.dropped.fetch_add(records, Ordering::Relaxed);
        tracing::warn!(file = %store.display(&path), records, error = %e, "could not write the served-feature log; its records are counted as dropped");
        return;
    }
    let prefix = store.child(LOG_DIR);
    let mut kept: Vec<_> = match store
        .store
        .list(Some(&prefix))
        .try_collect::<Vec<_>>()
        .await
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(dir = %store.display(&prefix), error = %e, "cannot list the served-feature log to delete its oldest files");
            return;
        }
    };
    if kept.len() > config.max_files {
        kept.sort_by(|a, b| a.location.cmp(&b.location));
        let excess = kept.len() - config.max_files;
        for f in &kept[..excess] {
            if let Err(e) = store.store.delete(&f.location).await {
                tracing::warn!(file = %store.display(&f.location), error = %e, "cannot delete an old served-feature log file; the log grows past its bound");
            }
        }
    }
}

/// Reads every served record in the store.
pub async fn read_all(store: &Location) -> duet_batch::Result<Vec<ServedRecord>> {
    let prefix = store.child(LOG_DIR);
    let files: Vec<_> = store
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| duet_batch::Error::Storage(format!("cannot list {}: {e}", store.url)))?;
    let mut out = Vec::new();
    for f in files {
        let bytes = store
            .store
            .get(&f.location)
            .await
            .map_err(|e| duet_batch::Error::Storage(e.to_string()))?
            .bytes()
            .await
            .map_err(|e| duet_batch::Error::Storage(e.to_string()))?;
        let mut unreadable = 0u64;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice(line) {
                Ok(r) => out.push(r),
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(file = %f.location, lines = unreadable, "skipped unreadable served-log lines");
        }
    }
    out.sort_by_key(|r: &ServedRecord| r.served_at_ms);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: i64) -> Served {
        Served {
            served_at_ms: i,
            as_of_ms: i,
            entity: format!("u{i}"),
            names: Arc::from(["a".to_string(), "b".to_string(), "c".to_string()]),
            values: vec![Some(Value::Int(i)), None, Some(Value::Null)],
            views: Arc::from(["v".to_string(), "w".to_string()]),
            snapshots: vec![(1, 7)],
        }
    }

    /// Every entity logged, at most 10 records queued and per file, and files cut only at that
    /// size (the flush interval never comes in a test).
    fn every_entity_ten_per_file() -> LogConfig {
        LogConfig {
            sample: 1.0,
            max_files: 1000,
            flush_every: Duration::from_secs(3600),
            capacity: 10,
        }
    }

    #[tokio::test]
    async fn files_and_queue_stay_bounded_and_nothing_is_lost_silently() {
        let store = duet_batch::store::resolve("memory://served-log-test").unwrap();
        let shutdown = CancellationToken::new();
        let config = every_entity_ten_per_file();
        let (log, task) = ServedLog::start(store.clone(), config, shutdown.clone());
        for i in 0..95 {
            log.record(record(i));
            if i % 5 == 0 {
                tokio::task::yield_now().await;
            }
        }
        shutdown.cancel();
        task.await.unwrap();
        let files = records_per_file(&store).await;
        let mut written = 0;
        for (file, lines) in &files {
            assert!(*lines <= 10, "{file} holds {lines} records");
            written += *lines as u64;
        }
        // The flush interval never came: files were cut at the capacity.
        assert!(files.len() >= 2, "{files:?}");
        assert_eq!(written + log.dropped.load(Ordering::Relaxed), 95);
        let read = read_all(&store).await.unwrap();
        assert_eq!(read.len() as u64, written);
        // An unserved (`INVALID`) value is left out; names and views come from the shared lists.
        let r = read.iter().find(|r| r.entity == "u3").unwrap();
        assert_eq!(
            r.values,
            BTreeMap::from([("a".into(), Value::Int(3)), ("c".into(), Value::Null)])
        );
        assert_eq!(r.snapshots, BTreeMap::from([("w".into(), 7)]));
    }

    /// Each file of the log in `store`, with the records it holds.
    async fn records_per_file(store: &Location) -> Vec<(object_store::path::Path, usize)> {
        let files: Vec<_> = store
            .store
            .list(Some(&store.child(LOG_DIR)))
            .try_collect()
            .await
            .unwrap();
        let mut out = Vec::new();
        for f in files {
            let bytes = store
                .store
                .get(&f.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let lines = bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            out.push((f.location, lines));
        }
        out
    }

    #[tokio::test]
    async fn files_stay_bounded_when_the_queue_is_drained_at_shutdown() {
        // Each round: 5 records in the writer's buffer, 10 more in the queue, then shutdown.
        // Whichever of the queue and the shutdown the writer sees first, no file may hold more
        // than 10 records (before, the drain at shutdown wrote all 15 into one file when the
        // shutdown came first).
        for round in 0..20 {
            let store =
                duet_batch::store::resolve(&format!("memory://served-log-drain-{round}")).unwrap();
            let shutdown = CancellationToken::new();
            let (log, task) =
                ServedLog::start(store.clone(), every_entity_ten_per_file(), shutdown.clone());
            for i in 0..5 {
                log.record(record(i));
            }
            tokio::task::yield_now().await;
            for i in 5..15 {
                log.record(record(i));
            }
            shutdown.cancel();
            task.await.unwrap();
            let read = read_all(&store).await.unwrap();
            assert_eq!(read.len(), 15, "round {round}");
            for (file, lines) in records_per_file(&store).await {
                assert!(lines <= 10, "round {round}: {file} holds {lines} records");
            }
        }
    }

    #[tokio::test]
    async fn records_in_a_file_the_store_refuses_are_counted_as_dropped() {
        // `served_log` is a plain file, so no log file can be written under it.
        let dir = std::env::temp_dir().join(format!(
            "duet-served-log-refused-{}-{}",
            std::process::id(),
            duet_speed::now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(LOG_DIR), b"not a directory").unwrap();
        let store = duet_batch::store::resolve(&dir.display().to_string()).unwrap();
        let shutdown = CancellationToken::new();
        let config = every_entity_ten_per_file();
        let (log, task) = ServedLog::start(store, config, shutdown.clone());
        for i in 0..25 {
            log.record(record(i));
            tokio::task::yield_now().await;
        }
        shutdown.cancel();
        task.await.unwrap();
        // Every record was either refused by the store or by the full queue: all are counted.
        assert_eq!(log.dropped.load(Ordering::Relaxed), 25);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
