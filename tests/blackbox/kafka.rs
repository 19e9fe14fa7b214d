//! Real Kafka-protocol broker and Redis helpers (CI starts tansu on 127.0.0.1:9092 and Redis
//! on 127.0.0.1:6379; a missing service fails the test).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// Bootstrap servers of the test broker.
pub fn brokers() -> String {
    std::env::var("DUET_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The test Redis.
pub fn redis_url() -> String {
    std::env::var("DUET_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A name unique to this test run.
pub fn unique(stem: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!(
        "{stem}-{}-{t}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates a topic with `partitions` partitions.
pub async fn create_topic(topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot reach the Kafka-protocol broker at {} (is tansu running?): {e}",
                brokers()
            )
        });
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
}

/// Produces `(key, value)` records in order and waits until all are delivered.
pub async fn produce(topic: &str, records: &[(Option<String>, Vec<u8>)]) {
    produce_to(&brokers(), topic, records).await
}

/// [`produce`] to the broker at `brokers`.
pub async fn produce_to(brokers: &str, topic: &str, records: &[(Option<String>, Vec<u8>)]) {
    let placed: Vec<_> = records.iter().map(|(k, v)| (None, k.clone(), v)).collect();
    send(brokers, topic, &placed, 10_000).await
}

/// [`produce`], each record in a record batch of its own: for tests whose consumers resume from
/// committed offsets anywhere in the log. tansu 0.6.0 answers a fetch from an offset inside a
/// record batch with the batches after it, so a consumer resuming there would never see the
/// rest of that batch (Kafka returns the batch, and the client skips the records before the
/// offset).
pub async fn produce_unbatched(topic: &str, records: &[(Option<String>, Vec<u8>)]) {
    let placed: Vec<_> = records.iter().map(|(k, v)| (None, k.clone(), v)).collect();
    send(&brokers(), topic, &placed, 1).await
}

/// Produces `(partition, key, value)` records to the partitions named, in order, and waits
/// until all are delivered.
pub async fn produce_placed(topic: &str, records: &[(i32, String, Vec<u8>)]) {
    let placed: Vec<_> = records
        .iter()
        .map(|(p, k, v)| (Some(*p), Some(k.clone()), v))
        .collect();
    send(&brokers(), topic, &placed, 10_000).await
}

/// Records (with their partition when set, else the key's) in order, all delivered, at most
/// `per_batch` in a record batch.
async fn send(
    brokers: &str,
    topic: &str,
    records: &[(Option<i32>, Option<String>, &Vec<u8>)],
    per_batch: usize,
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", per_batch.to_string())
        .set("message.timeout.ms", "60000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(records.len());
    for (p, k, v) in records {
        loop {
            let mut r = FutureRecord::to(topic).payload(*v);
            if let Some(k) = k {
                r = r.key(k);
            }
            if let Some(p) = p {
                r = r.partition(*p);
            }
            match producer.send_result(r) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((e, _)) => {
                    assert!(e.to_string().contains("Queue full"), "cannot produce: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    for d in futures::future::join_all(pending).await {
        d.expect("delivery not cancelled")
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");
}

/// Deletes every Redis key with `prefix`.
pub fn clean_redis(prefix: &str) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut con = client
        .get_connection()
        .expect("Redis answers (is redis-server running?)");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut con)
        .unwrap();
    for k in keys {
        let _: () = redis::cmd("DEL").arg(k).query(&mut con).unwrap();
    }
}

/// True when `group` has committed every one of the `partitions` of `topic` at or past the end
/// the broker reports for it.
pub fn group_caught_up(topic: &str, group: &str, partitions: i32) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    committed.elements().iter().all(|e| {
        let (_, end) = consumer
            .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
            .unwrap();
        matches!(e.offset(), Offset::Offset(o) if o >= end)
    })
}
