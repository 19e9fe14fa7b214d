//! JSON-lines parsing: duet's event decoder against `serde_json::Value` on the same golden
//! lines, one core each. Prints events/s for both and the ratio.

use std::time::Instant;

use duet_spec::event::JsonLinesDecoder;

fn main() {
    let golden = duet_bench::golden_lines();
    let copies = 12;
    let mut text = Vec::with_capacity(golden.len() * copies);
    for _ in 0..copies {
        text.extend_from_slice(&golden);
    }
    let lines = text.iter().filter(|b| **b == b'\n').count();
    // Warm up both paths once.
    let mut d = JsonLinesDecoder::new("warmup", 64 * 1024);
    d.decode(&golden);
    let mut best_duet = f64::MAX;
    let mut best_value = f64::MAX;
    let mut valid = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let mut d = JsonLinesDecoder::new("bench", 64 * 1024);
        d.decode(&text);
        let batches = d.finish();
        valid = batches.iter().map(|b| b.num_rows()).sum::<usize>();
        best_duet = best_duet.min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut n = 0usize;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                n += v.as_object().map_or(0, |o| o.len());
            }
        }
        std::hint::black_box(n);
        best_value = best_value.min(t.elapsed().as_secs_f64());
    }
    let duet_rate = lines as f64 / best_duet;
    let value_rate = lines as f64 / best_value;
    println!("lines                         {lines} ({copies} copies of the golden events.jsonl)");
    println!("valid events decoded          {valid}");
    println!(
        "duet decoder (validated Arrow) {:>12.0} events/s/core",
        duet_rate
    );
    println!(
        "serde_json::Value (parse only) {:>12.0} events/s/core",
        value_rate
    );
    println!(
        "ratio duet / serde_json::Value {:>12.2}x",
        duet_rate / value_rate
    );
    println!(
        "target ≥ 1,000,000 events/s/core: {}",
        if duet_rate >= 1e6 { "met" } else { "NOT met" }
    );
}
