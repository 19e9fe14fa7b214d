//! The speed layer's processing alone, on one machine's cores and without Kafka or Redis: the
//! same generated stream as bench-speed, in batches through the processor into the in-memory
//! state store. It isolates the CPU cost per event from the broker's and Redis's.
//!
//! Usage: bench-processor [--events 3000000] [--users 200000] [--batch 500000]

use std::sync::Arc;
use std::time::Instant;

use duet_bench::arg;
use duet_spec::generate::{GenerateOptions, generate, write_jsonl};
use duet_speed::plan::SpeedPlan;
use duet_speed::processor::{Message, Processor};
use duet_speed::store::MemoryStore;

/// The allocator of the `duet` binary.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let n: u64 = arg("--events", "3000000").parse().unwrap();
    let users: u64 = arg("--users", "200000").parse().unwrap();
    let batch: usize = arg("--batch", "500000").parse().unwrap();
    let now = duet_speed::now_ms();
    let mut opts = GenerateOptions::new(users, 1, now - 3_600_000, 3);
    opts.events = Some(n);
    opts.duplicate_rate = 0.0;
    opts.invalid_rate = 0.0;
    let mut text = Vec::new();
    write_jsonl(&generate(&opts), 3, &mut text).unwrap();
    let messages: Vec<Message> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| Message {
            partition: 0,
            offset: i as i64,
            payload: Some(l.to_vec().into()),
            timestamp_ms: None,
        })
        .collect();
    eprintln!(
        "generated {} messages in {:.1}s",
        messages.len(),
        duet_speed::now_ms().saturating_sub(now) as f64 / 1000.0
    );
    let spec = duet_spec::parse_spec("catalog.toml", duet_spec::CATALOG).unwrap();
    let plan = Arc::new(SpeedPlan::compile(&spec));
    let mut processor = Processor::new(plan, MemoryStore::new(), "bench:", "events");
    let chunks: Vec<Vec<Message>> = messages.chunks(batch).map(<[Message]>::to_vec).collect();
    let started = Instant::now();
    let mut applied = 0;
    for chunk in chunks {
        let outcome = processor.process(chunk, now).await.unwrap();
        applied += outcome.applied;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "processor alone: {} messages ({applied} applied) in {secs:.2}s = {:.0} events/s, batches of {batch}",
        messages.len(),
        messages.len() as f64 / secs
    );
}
