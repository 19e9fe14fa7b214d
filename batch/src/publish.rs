//! The snapshot store: versioned Parquet snapshots published atomically.
//!
//! Layout under the store URL:
//!
//! ```text
//! snapshots/<view>/runs/<run_id>/<as_of>.parquet  written first, never modified
//! snapshots/<view>/commits/<as_of>.json          the manifest; one atomic PUT publishes it
//! dead_letters/<run_id>.jsonl                    invalid events of a run
//! _lease/batch.json                              held while a batch job runs
//! ```
//!
//! A reader lists `commits/` and follows a manifest to its data, so it sees the previous
//! snapshot or the new one, never a partial one: a job killed before its commit PUT leaves only
//! an unreferenced run directory, which the next job deletes.

use std::collections::BTreeMap;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::log::InputFile;
use crate::store::Location;
use crate::{Error, Result};

/// A feature as recorded in a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestFeature {
    /// Served name.
    pub name: String,
    /// `int` or `float`.
    pub value_type: String,
    /// The definition's fingerprint.
    pub fingerprint: String,
}

/// What a published snapshot is: written as `commits/<as_of>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The view.
    pub view: String,
    /// The instant the snapshot is as of (RFC 3339).
    pub as_of: String,
    /// The same, in epoch milliseconds.
    pub as_of_ms: i64,
    /// The join key column.
    pub join_key: String,
    /// The spec version that made it.
    pub spec_version: u32,
    /// The spec's fingerprint.
    pub spec_fingerprint: String,
    /// The features, in column order.
    pub features: Vec<ManifestFeature>,
    /// Entities in the snapshot.
    pub rows: u64,
    /// The data file, relative to the store root.
    pub data: String,
    /// Its size in bytes.
    pub data_bytes: u64,
    /// Input files read.
    pub inputs: Vec<InputFile>,
    /// Valid input records (duplicates included).
    pub valid_events: u64,
    /// Duplicate records dropped.
    pub duplicates: u64,
    /// Invalid records by reason.
    pub invalid: BTreeMap<String, u64>,
    /// Total invalid records.
    pub invalid_total: u64,
    /// The run that made it.
    pub run_id: String,
    /// Wall-clock time the run had spent when this snapshot was published (ms).
    pub duration_ms: u64,
    /// When it was published (RFC 3339).
    pub created_at: String,
    /// duet's version.
    pub duet_version: String,
}

/// The commit file name of an as-of instant: sortable, readable, no colons.
pub fn as_of_key(as_of_ms: i64) -> String {
    duet_spec::timestamp::format_ms(as_of_ms).replace(':', "")
}

fn view_dir(view: &str) -> String {
    format!("snapshots/{view}")
}

fn storage(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{what}: {e}"))
}

/// The directory of a view's manifests, and every file in it.
async fn commit_files(store: &Location, view: &str) -> Result<(Path, Vec<Path>)> {
    let prefix = store.child(&format!("{}/commits", view_dir(view)));
    let files = store
        .store
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .map_err(|e| storage(&format!("cannot list snapshots in {}", store.url), e))?;
    Ok((prefix, files))
}

/// Every published manifest of a view, oldest first.
pub async fn list_manifests(store: &Location, view: &str) -> Result<Vec<Manifest>> {
    let (_, files) = commit_files(store, view).await?;
    let mut manifests: Vec<Manifest> = futures::stream::iter(files)
        .map(|path| async move { read_manifest(store, &path).await })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    manifests.sort_by_key(|m| m.as_of_ms);
    Ok(manifests)
}

async fn read_manifest(store: &Location, path: &Path) -> Result<Manifest> {
    let bytes = store
        .store
        .get(path)
        .await
        .map_err(|e| storage(&format!("cannot read {}", store.display(path)), e))?
        .bytes()
        .await
        .map_err(|e| storage(&format!("cannot read {}", store.display(path)), e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::Storage(format!(
            "{} is not a snapshot manifest: {e}",
            store.display(path)
        ))
    })
}

/// The instant a manifest's file name stands for: the name is [`as_of_key`] of it plus `.json`.
fn key_instant(file_name: &str) -> Option<i64> {
    let key = file_name.strip_suffix(".json")?;
    // `2026-11-20T000000.000Z` is `2026-11-20T00:00:00.000Z` without its colons.
    let (date_hour, rest) = (key.get(..13)?, key.get(13..)?);
    let (minute, rest) = (rest.get(..2)?, rest.get(2..)?);
    let t = duet_spec::timestamp::parse_rfc3339_ms(&format!("{date_hour}:{minute}:{rest}"))?;
    (as_of_key(t) == key).then_some(t)
}

/// The newest published manifest of a view, if any.
///
/// A manifest's name is its as-of instant, so this lists the names and reads only the newest
/// manifest, not every one (a server polls this every few seconds). Files under `commits/`
/// whose names are not manifest names (notes, editor backups, subfolders) are ignored. A
/// manifest that cannot be read, or whose instant is not its name's, is an error, as is a
/// failure of the store.
pub async fn latest_manifest(store: &Location, view: &str) -> Result<Option<Manifest>> {
    latest_manifest_until(store, view, i64::MAX).await
}

/// The newest published manifest of a view as of `until` or earlier, if any: the snapshot a
/// lookup at `until` is served from when none was published for exactly that instant. Reads
/// as [`latest_manifest`] does.
pub async fn latest_manifest_until(
    store: &Location,
    view: &str,
    until: i64,
) -> Result<Option<Manifest>> {
    let (prefix, listed) = commit_files(store, view).await?;
    let newest = listed
        .into_iter()
        .filter_map(|path| {
            let name = path
                .as_ref()
                .strip_prefix(prefix.as_ref())?
                .strip_prefix('/')?;
            let at = key_instant(name);
            if at.is_none() {
                tracing::debug!(file = %store.display(&path), "not a manifest name: ignored");
            }
            Some((at?, path))
        })
        .filter(|(at, _)| *at <= until)
        .max_by_key(|(at, _)| *at);
    let Some((at, path)) = newest else {
        return Ok(None);
    };
    let manifest = read_manifest(store, &path).await?;
    if manifest.as_of_ms != at {
        return Err(Error::Storage(format!(
            "{} is the manifest of a snapshot as of {}, not of the instant its name says",
            store.display(&path),
            manifest.as_of
        )));
    }
    Ok(Some(manifest))
}

/// The manifest of the snapshot as of exactly `as_of_ms`, if published.
pub async fn manifest_at(store: &Location, view: &str, as_of_ms: i64) -> Result<Option<Manifest>> {
    let path = store.child(&format!(
        "{}/commits/{}.json",
        view_dir(view),
        as_of_key(as_of_ms)
    ));
    match store.store.head(&path).await {
        Ok(_) => Ok(Some(read_manifest(store, &path).await?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(storage(&format!("cannot read {}", store.display(&path)), e)),
    }
}

/// Reads a snapshot's rows.
pub async fn read_snapshot(store: &Location, manifest: &Manifest) -> Result<Vec<RecordBatch>> {
    let path = store.child(&manifest.data);
    let name = store.display(&path);
    let what = format!("cannot read snapshot {name}");
    let bytes = store
        .store
        .get(&path)
        .await
        .map_err(|e| storage(&what, e))?
        .bytes()
        .await
        .map_err(|e| storage(&what, e))?;
    tokio::task::spawn_blocking(move || {
        ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.with_batch_size(64 * 1024).build())
            .map_err(|e| storage(&what, e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| storage(&what, e))
    })
    .await
    .map_err(|e| Error::Internal(format!("snapshot reading task failed: {e}")))?
}

/// Encodes a snapshot's rows as a Parquet file (see [`crate::pages`]: keys prefix-encoded,
/// integers delta-encoded, few-valued floats by dictionary, nothing compressed). CPU work:
/// callers run it off the async runtime, beside the fold that made the rows.
pub fn encode_snapshot(batch: &RecordBatch) -> Result<Vec<u8>> {
    crate::pages::encode_file(batch)
}

/// Writes a snapshot's data file (encoded by [`encode_snapshot`]) under the run's directory;
/// returns its path and size.
pub async fn write_data(
    store: &Location,
    view: &str,
    run_id: &str,
    as_of_ms: i64,
    parquet: Vec<u8>,
) -> Result<(String, u64)> {
    let rel = format!(
        "{}/runs/{run_id}/{}.parquet",
        view_dir(view),
        as_of_key(as_of_ms)
    );
    let size = parquet.len() as u64;
    let path = store.child(&rel);
    put_large(store, &path, Bytes::from(parquet)).await?;
    Ok((rel, size))
}

async fn put_large(store: &Location, path: &Path, bytes: Bytes) -> Result<()> {
    const PART: usize = 16 << 20;
    let what = format!("cannot write {}", store.display(path));
    if bytes.len() <= PART {
        store
            .store
            .put(path, bytes.into())
            .await
            .map_err(|e| storage(&what, e))?;
        return Ok(());
    }
    let mut upload = store
        .store
        .put_multipart(path)
        .await
        .map_err(|e| storage(&what, e))?;
    for chunk in bytes.chunks(PART) {
        if let Err(e) = upload.put_part(bytes.slice_ref(chunk).into()).await {
            let _ = upload.abort().await;
            return Err(storage(&what, e));
        }
    }
    upload.complete().await.map_err(|e| storage(&what, e))?;
    Ok(())
}

/// Publishes a manifest: one atomic PUT makes the snapshot visible (replacing an earlier one
/// as of the same instant).
pub async fn commit(store: &Location, manifest: &Manifest) -> Result<()> {
    let path = store.child(&format!(
        "{}/commits/{}.json",
        view_dir(&manifest.view),
        as_of_key(manifest.as_of_ms)
    ));
    let body = serde_json::to_vec_pretty(manifest).expect("serializable");
    store
        .store
        .put(&path, body.into())
        .await
        .map_err(|e| storage(&format!("cannot publish {}", store.display(&path)), e))?;
    Ok(())
}

/// Keeps the newest `retain` snapshots of a view, deletes the rest, and deletes run
/// directories no manifest refers to (left by replaced snapshots and killed jobs), except the
/// current run's. Returns the as-of keys of deleted snapshots.
pub async fn enforce_retention(
    store: &Location,
    view: &str,
    retain: usize,
    current_run: &str,
) -> Result<Vec<String>> {
    let manifests = list_manifests(store, view).await?;
    let excess = manifests.len().saturating_sub(retain.max(1));
    let mut deleted = Vec::new();
    for m in &manifests[..excess] {
        let path = store.child(&format!(
            "{}/commits/{}.json",
            view_dir(view),
            as_of_key(m.as_of_ms)
        ));
        store
            .store
            .delete(&path)
            .await
            .map_err(|e| storage(&format!("cannot delete {}", store.display(&path)), e))?;
        deleted.push(m.as_of.clone());
    }
    let referenced: std::collections::HashSet<&str> = manifests[excess..]
        .iter()
        .map(|m| m.data.as_str())
        .collect();
    let runs = store.child(&format!("{}/runs", view_dir(view)));
    let files: Vec<_> = store
        .store
        .list(Some(&runs))
        .try_collect()
        .await
        .map_err(|e| storage(&format!("cannot list {}", store.url), e))?;
    let root_len = store.prefix.as_ref().len();
    for f in files {
        let rel = f.location.as_ref()[root_len..].trim_start_matches('/');
        if !referenced.contains(rel) && !rel.contains(&format!("/runs/{current_run}/")) {
            let _ = store.store.delete(&f.location).await;
        }
    }
    Ok(deleted)
}

/// Writes a run's dead letters as JSON lines; returns their path relative to the store.
pub async fn write_dead_letters(
    store: &Location,
    run_id: &str,
    lines: &[duet_spec::event::DeadLetter],
) -> Result<String> {
    let rel = format!("dead_letters/{run_id}.jsonl");
    let mut text = String::new();
    for d in lines {
        text.push_str(&d.to_json_line());
        text.push('\n');
    }
    put_large(store, &store.child(&rel), Bytes::from(text)).await?;
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::basic::Encoding;

    use super::*;

    #[test]
    fn snapshots_read_back_and_few_valued_floats_take_a_dictionary() {
        let n = 10_000;
        let keys: Vec<String> = (0..n).map(|i| format!("u{i:07}")).collect();
        let rate: Vec<Option<f64>> = (0..n)
            .map(|i| match i % 7 {
                0 => None,
                1 => Some(0.5),
                _ => Some(0.0),
            })
            .collect();
        let amount: Vec<Option<f64>> = (0..n).map(|i| Some(i as f64 * 1.25)).collect();
        let count: Vec<Option<i64>> = (0..n).map(|i| Some(i as i64 % 13)).collect();
        let batch = RecordBatch::try_from_iter(vec![
            ("user_id", Arc::new(StringArray::from(keys)) as _),
            ("rate", Arc::new(Float64Array::from(rate)) as _),
            ("amount", Arc::new(Float64Array::from(amount)) as _),
            ("count", Arc::new(Int64Array::from(count)) as _),
        ])
        .unwrap();
        let bytes = encode_snapshot(&batch).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
        let encodings = |c: usize| -> Vec<Encoding> {
            reader
                .metadata()
                .row_group(0)
                .column(c)
                .encodings()
                .collect()
        };
        assert!(
            encodings(1).contains(&Encoding::RLE_DICTIONARY),
            "a rate of two values: {:?}",
            encodings(1)
        );
        assert!(
            !encodings(2).contains(&Encoding::RLE_DICTIONARY),
            "distinct amounts: {:?}",
            encodings(2)
        );
        let read: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let read = arrow::compute::concat_batches(&batch.schema(), &read).unwrap();
        assert_eq!(read, batch);
        assert_eq!(read.column(1).null_count(), batch.column(1).null_count());
    }

    fn manifest(as_of_ms: i64) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "view": "v", "as_of": duet_spec::timestamp::format_ms(as_of_ms), "as_of_ms": as_of_ms,
            "join_key": "user_id", "spec_version": 1, "spec_fingerprint": "f", "features": [],
            "rows": 3, "data": "d", "data_bytes": 0, "inputs": [], "valid_events": 0,
            "duplicates": 0, "invalid": {}, "invalid_total": 0, "run_id": "r", "duration_ms": 0,
            "created_at": "2026-12-01T00:00:00Z", "duet_version": "0"
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn the_latest_manifest_is_the_newest_readable_one() {
        let store = crate::store::resolve("memory://latest-manifest-test").unwrap();
        assert!(latest_manifest(&store, "v").await.unwrap().is_none());
        let day = 86_400_000;
        // Published out of order: the newest is chosen by its instant, not by when it came.
        for d in [20_400, 20_402, 20_401] {
            commit(&store, &manifest(d * day)).await.unwrap();
        }
        // Files whose names are not manifest names, some sorting after every manifest.
        for name in [
            "zz-notes.json",
            "2099-01-01.json",
            "2099-01-01T000000.000Z.json~",
            "old/2099-01-01T000000.000Z.json",
        ] {
            let path = store.child(&format!("snapshots/v/commits/{name}"));
            let body = serde_json::to_vec(&manifest(20_500 * day)).unwrap();
            store.store.put(&path, body.into()).await.unwrap();
        }
        let latest = latest_manifest(&store, "v").await.unwrap().unwrap();
        assert_eq!(latest.as_of_ms, 20_402 * day);
        // Bounded: the newest at or before the bound, the bound itself included.
        let until = |t: i64| {
            let store = &store;
            async move {
                latest_manifest_until(store, "v", t)
                    .await
                    .unwrap()
                    .map(|m| m.as_of_ms / day)
            }
        };
        assert_eq!(until(20_401 * day).await, Some(20_401));
        assert_eq!(until(20_402 * day - 1).await, Some(20_401));
        assert_eq!(until(20_400 * day + 5).await, Some(20_400));
        assert_eq!(until(20_400 * day - 1).await, None);
        // The newest manifest damaged, or holding another instant than its name: an error, not
        // a silent fall back to an older snapshot.
        let newest = store.child(&format!(
            "snapshots/v/commits/{}.json",
            as_of_key(20_403 * day)
        ));
        store
            .store
            .put(&newest, b"{\"view\": 1}".to_vec().into())
            .await
            .unwrap();
        let err = latest_manifest(&store, "v").await.unwrap_err().to_string();
        assert!(err.contains("is not a snapshot manifest"), "{err}");
        let body = serde_json::to_vec(&manifest(20_401 * day)).unwrap();
        store.store.put(&newest, body.into()).await.unwrap();
        let err = latest_manifest(&store, "v").await.unwrap_err().to_string();
        assert!(err.contains("not of the instant its name says"), "{err}");
    }
}
