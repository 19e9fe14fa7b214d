//! `--archive URL`: consumed events written to the offline log as Parquet, partitioned by UTC
//! date and hour, so Kafka can be the single point of ingestion.
//!
//! Idempotent across crashes: before a batch's files are written, an intent object lists them
//! (`_archive/p<partition>.json`, with the batch's first offset). A process taking a partition
//! whose committed offset is at or before that first offset knows the batch was never committed
//! and deletes its files before the batch is consumed again, so no event is archived twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use duet_batch::store::{Location, resolve};
use duet_spec::event::{Event, EventBatchBuilder};
use duet_spec::timestamp::format_ms;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use crate::processor::BatchOutcome;
use crate::{Error, Result};

/// What a partition's last archive write intended.
#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    first_offset: i64,
    files: Vec<String>,
}

/// The archive's location.
pub struct Archive {
    loc: Location,
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("archive: {e}"))
}

impl Archive {
    /// Opens the archive at `url` (local path, file://, s3:// or memory://).
    pub fn open(url: &str) -> Result<Archive> {
        let loc = resolve(url).map_err(|e| Error::BadInput(format!("--archive: {e}")))?;
        Ok(Archive { loc })
    }

    fn intent_path(&self, partition: i32) -> object_store::path::Path {
        self.loc.child(&format!("_archive/p{partition}.json"))
    }

    /// Deletes the files of a batch of `partition` that was written but never committed
    /// (its first offset is at or after the committed offset).
    pub async fn recover(&self, partition: i32, committed: Option<i64>) -> Result<()> {
        let path = self.intent_path(partition);
        let intent: Intent = match self.loc.store.get(&path).await {
            Ok(r) => serde_json::from_slice(&r.bytes().await.map_err(storage)?).map_err(storage)?,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(storage(e)),
        };
        if intent.first_offset >= committed.unwrap_or(0) {
            for f in &intent.files {
                match self.loc.store.delete(&self.loc.child(f)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(storage(e)),
                }
            }
            tracing::info!(
                partition,
                files = intent.files.len(),
                "removed archive files of an uncommitted batch"
            );
        }
        Ok(())
    }

    /// Writes a batch's accepted events, one file per partition, date and hour.
    pub async fn write(&mut self, outcome: &BatchOutcome) -> Result<()> {
        let mut groups: BTreeMap<(i32, String, i64), Vec<&Event>> = BTreeMap::new();
        for (p, e) in &outcome.accepted {
            let day = &format_ms(e.ts)[..10];
            let hour = e.ts.div_euclid(3_600_000).rem_euclid(24);
            groups
                .entry((*p, day.to_string(), hour))
                .or_default()
                .push(e);
        }
        let mut by_partition: BTreeMap<i32, Vec<(String, Vec<&Event>)>> = BTreeMap::new();
        for ((p, day, hour), events) in groups {
            let first = outcome.first_offsets[&p];
            let name = format!("date={day}/hour={hour:02}/p{p}-{first:020}.parquet");
            by_partition.entry(p).or_default().push((name, events));
        }
        for (p, files) in by_partition {
            let intent = Intent {
                first_offset: outcome.first_offsets[&p],
                files: files.iter().map(|(n, _)| n.clone()).collect(),
            };
            self.loc
                .store
                .put(
                    &self.intent_path(p),
                    serde_json::to_vec(&intent).expect("serializable").into(),
                )
                .await
                .map_err(storage)?;
            for (name, events) in files {
                let mut b = EventBatchBuilder::with_capacity(events.len());
                for e in events {
                    b.append(&e.event_id, &e.user_id, &e.event_type, e.amount, e.ts);
                }
                let batch = b.finish();
                let mut buf = Vec::new();
                let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None)
                    .map_err(storage)?;
                w.write(&batch).map_err(storage)?;
                w.close().map_err(storage)?;
                self.loc
                    .store
                    .put(&self.loc.child(&name), buf.into())
                    .await
                    .map_err(storage)?;
            }
        }
        Ok(())
    }

    /// The archive's location.
    pub fn location(&self) -> Arc<dyn object_store::ObjectStore> {
        self.loc.store.clone()
    }
}
