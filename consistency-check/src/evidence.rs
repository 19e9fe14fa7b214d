//! What the checker knows about where events went: the offline log, optionally the Kafka
//! topic, and the speed layer's counters — used to name the cause of a disagreement.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::TimestampMillisecondType;
use duet_batch::log::EventLog;
use duet_spec::event::parse_json_event;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{Error, Result};

/// Longest time reading the topic may take.
const READ_LIMIT: Duration = Duration::from_secs(600);

/// Events per entity: `(ts, event_id)`, sorted.
type ByEntity = HashMap<String, Vec<(i64, String)>>;

/// The evidence a cause is read from.
pub struct Evidence {
    log: ByEntity,
    kafka: Option<ByEntity>,
    late: i64,
}

fn index(pairs: impl Iterator<Item = (String, i64, String)>) -> ByEntity {
    let mut map: ByEntity = HashMap::new();
    for (entity, ts, id) in pairs {
        map.entry(entity).or_default().push((ts, id));
    }
    for v in map.values_mut() {
        v.sort();
        v.dedup();
    }
    map
}

impl Evidence {
    /// Indexes the log and, when given `(brokers, topic)`, everything on the topic.
    pub async fn gather(
        log: &EventLog,
        kafka: Option<&(String, String)>,
        late: i64,
    ) -> Result<Evidence> {
        let log_index = index(log.batches.iter().flat_map(|b| {
            let ids = b.column(0).as_string::<i32>().clone();
            let users = b.column(1).as_string::<i32>().clone();
            let ts = b
                .column(4)
                .as_primitive::<TimestampMillisecondType>()
                .clone();
            (0..b.num_rows()).map(move |i| {
                (
                    users.value(i).to_string(),
                    ts.value(i),
                    ids.value(i).to_string(),
                )
            })
        }));
        let kafka = match kafka {
            Some((brokers, topic)) => {
                let (b, t) = (brokers.clone(), topic.clone());
                Some(
                    tokio::task::spawn_blocking(move || read_topic(&b, &t))
                        .await
                        .map_err(|e| Error::Read(e.to_string()))??,
                )
            }
            None => None,
        };
        Ok(Evidence {
            log: log_index,
            kafka,
            late,
        })
    }

    /// Entities with logged events in `[from, to)`.
    pub fn active_entities(&self, from: i64, to: i64) -> Vec<String> {
        self.log
            .iter()
            .filter(|(_, evs)| evs.iter().any(|(ts, _)| *ts >= from && *ts < to))
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// The most likely cause of a disagreement for `entity` over events in `window`.
    pub fn classify(&self, entity: &str, window: (i64, i64), has_state: bool) -> String {
        fn in_window(evs: Option<&Vec<(i64, String)>>, window: (i64, i64)) -> Vec<&(i64, String)> {
            evs.map(|v| {
                v.iter()
                    .filter(|(ts, _)| *ts >= window.0 && *ts < window.1)
                    .collect()
            })
            .unwrap_or_default()
        }
        let logged = in_window(self.log.get(entity), window);
        if let Some(kafka) = &self.kafka {
            let sent = in_window(kafka.get(entity), window);
            let sent_ids: HashSet<&str> = sent.iter().map(|(_, id)| id.as_str()).collect();
            let logged_ids: HashSet<&str> = logged.iter().map(|(_, id)| id.as_str()).collect();
            if logged.iter().any(|(_, id)| !sent_ids.contains(id.as_str())) {
                return "not_in_kafka".into();
            }
            if sent.iter().any(|(_, id)| !logged_ids.contains(id.as_str())) {
                return "not_in_log".into();
            }
        }
        if !has_state && !logged.is_empty() {
            return if self.late > 0 {
                "late_events".into()
            } else {
                "state_missing_or_expired".into()
            };
        }
        if self.late > 0 {
            return "late_events".into();
        }
        "unexplained".into()
    }
}

/// Every valid event on the topic, by entity.
///
/// Each partition is read from its beginning until the consumer reports its end: the end the
/// broker states in its fetch responses, not the one a separate offsets query returns (some
/// Kafka-protocol brokers answer that query with the first offset of the newest record batch,
/// which would silently cut the evidence short). A read that cannot finish is an error, never
/// partial evidence.
fn read_topic(brokers: &str, topic: &str) -> Result<ByEntity> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("duet-check-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| Error::Read(format!("--brokers {brokers}: {e}")))?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(15))
        .map_err(|e| Error::Read(format!("cannot read topic {topic}: {e}")))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::BadInput(format!(
            "--topic `{topic}` does not exist on {brokers}"
        )));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| Error::Read(e.to_string()))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| Error::Read(e.to_string()))?;
    let mut remaining: HashSet<i32> = partitions.iter().copied().collect();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + READ_LIMIT;
    while !remaining.is_empty() {
        if std::time::Instant::now() >= deadline {
            let mut left: Vec<i32> = remaining.into_iter().collect();
            left.sort();
            return Err(Error::Read(format!(
                "topic `{topic}` on {brokers}: partitions {left:?} not read to their end within {READ_LIMIT:?}"
            )));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) => return Err(Error::Read(format!("topic `{topic}`: {e}"))),
            Some(Ok(m)) => {
                if let Some(e) = m.payload().and_then(|p| parse_json_event(p).ok()) {
                    out.push((e.user_id.into_owned(), e.ts, e.event_id.into_owned()));
                }
            }
        }
    }
    Ok(index(out.into_iter()))
}
