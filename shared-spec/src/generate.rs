//! `duet generate`: deterministic synthetic events with the golden set's character.
//!
//! Users have sessions (bursts of events minutes apart, separated by hours), sessions hold
//! logins, views, purchases and refunds with heavy-tailed amounts; about 1% of records are
//! exact duplicates, about 0.2% are invalid, file order is disordered by up to
//! [`MAX_DISORDER_MS`], and JSON timestamps carry mixed UTC offsets. The same seed always gives
//! the same bytes.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{Float64Builder, StringBuilder, TimestampMillisecondBuilder};
use arrow::record_batch::RecordBatch;

use crate::duration::{DAY_MS, MINUTE_MS};
use crate::event::event_schema;
use crate::timestamp::civil_from_days;

/// How far a record may appear after records with later event times, in file order.
pub const MAX_DISORDER_MS: i64 = 2 * MINUTE_MS;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Number of distinct users.
    pub users: u64,
    /// Days of history, ending at `end_ms`.
    pub days: u64,
    /// Exclusive end of the event times, epoch milliseconds.
    pub end_ms: i64,
    /// Seed of the pseudo-random sequence.
    pub seed: u64,
    /// Number of valid, distinct events (duplicates and invalid records come on top). `None`:
    /// four per user per day.
    pub events: Option<u64>,
    /// Fraction of records duplicated.
    pub duplicate_rate: f64,
    /// Fraction of records made invalid.
    pub invalid_rate: f64,
}

impl GenerateOptions {
    /// Options with the golden set's rates.
    pub fn new(users: u64, days: u64, end_ms: i64, seed: u64) -> Self {
        GenerateOptions {
            users,
            days,
            end_ms,
            seed,
            events: None,
            duplicate_rate: 0.01,
            invalid_rate: 0.002,
        }
    }
}

/// A compact generated record.
#[derive(Debug, Clone, Copy)]
pub struct GenEvent {
    /// Sequence number: the event id is `e{seed}-{id}`.
    pub id: u64,
    /// User index.
    pub user: u32,
    /// 0 login, 1 view, 2 purchase, 3 refund.
    pub kind: u8,
    /// Amount in cents (purchases and refunds).
    pub cents: i64,
    /// Event time.
    pub ts: i64,
    /// 0: valid. Otherwise which rule it breaks (see `Invalid`).
    pub invalid: u8,
}

const KINDS: [&str; 4] = ["login", "view", "purchase", "refund"];
const OFFSETS_MIN: [i64; 4] = [0, 330, -300, 60];

/// SplitMix64: small, fast, and fixed forever, so a seed reproduces the same data in every
/// version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (1.0 - self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Generates the records in file order (disordered, with duplicates and invalid records).
pub fn generate(opts: &GenerateOptions) -> Vec<GenEvent> {
    let mut rng = Rng(opts.seed ^ 0xD1E7_5EED);
    let users = opts.users.max(1);
    let span = (opts.days.max(1) as i64) * DAY_MS;
    let start = opts.end_ms - span;
    let target = opts.events.unwrap_or(users * opts.days.max(1) * 4);
    let mut out: Vec<GenEvent> = Vec::with_capacity((target as f64 * 1.02) as usize + 16);
    let mut id = 0u64;
    while (out.len() as u64) < target {
        // Activity is skewed: a few users are far busier than most.
        let user = (users as f64 * rng.unit().powi(2)) as u32;
        let user = (user as u64 * 2_654_435_761 % users) as u32;
        let mut t = start + rng.below(span as u64) as i64;
        let len = 1 + rng.exp(5.0) as u64;
        for i in 0..len {
            if t >= opts.end_ms || out.len() as u64 >= target {
                break;
            }
            let r = rng.unit();
            let kind = if i == 0 && r < 0.6 {
                0
            } else if r < 0.70 {
                1
            } else if r < 0.96 {
                2
            } else {
                3
            };
            let cents = match kind {
                2 => ((3.5 + 1.1 * rng.normal()).exp() * 100.0).round().max(1.0) as i64,
                3 => ((3.0 + 1.0 * rng.normal()).exp() * 100.0).round().max(1.0) as i64,
                _ => 0,
            };
            out.push(GenEvent {
                id,
                user,
                kind,
                cents,
                ts: t,
                invalid: 0,
            });
            id += 1;
            // Gaps inside a session stay under the 30-minute session gap, mostly.
            t += (rng.exp(90_000.0) as i64).min(29 * MINUTE_MS) + 1;
        }
    }
    // Bounded disorder: order by a jittered time, so no record trails by more than the jitter.
    let mut keyed: Vec<(i64, GenEvent)> = out
        .into_iter()
        .map(|e| (e.ts + rng.below(MAX_DISORDER_MS as u64) as i64, e))
        .collect();
    keyed.sort_by_key(|(k, e)| (*k, e.id));
    let mut records = Vec::with_capacity(keyed.len() + keyed.len() / 50);
    for (_, e) in keyed {
        records.push(e);
        let r = rng.unit();
        if r < opts.duplicate_rate {
            records.push(e);
        } else if r < opts.duplicate_rate + opts.invalid_rate {
            let mut bad = e;
            bad.id += 1 << 40;
            bad.invalid = 1 + rng.below(5) as u8;
            if matches!(bad.invalid, 1 | 2) {
                bad.kind = 2 + rng.below(2) as u8;
            }
            records.push(bad);
        }
    }
    records
}

fn event_id(seed: u64, id: u64) -> String {
    format!("e{seed:x}-{id:010}")
}

fn user_id(user: u32) -> String {
    format!("u{user:07}")
}

/// Writes records as JSON lines. Invalid records break one rule each: 1 negative amount,
/// 2 null amount, 3 unparsable time, 4 missing user, 5 not JSON at all.
pub fn write_jsonl<W: Write>(records: &[GenEvent], seed: u64, mut w: W) -> std::io::Result<()> {
    let mut line = String::with_capacity(160);
    for e in records {
        line.clear();
        if e.invalid == 5 {
            line.push_str("{\"event_id\": \"");
            line.push_str(&event_id(seed, e.id));
            line.push_str("\", \"user_id\": tru\n");
            w.write_all(line.as_bytes())?;
            continue;
        }
        let offset = OFFSETS_MIN[(e.user as usize * 7 + 3) % 4];
        let ts = if e.invalid == 3 {
            "2026-13-45T99:00:00Z".to_string()
        } else {
            format_with_offset(e.ts, offset)
        };
        let amount = match (e.invalid, e.kind) {
            (1, _) => format!("-{}.{:02}", e.cents / 100, e.cents % 100),
            (2, _) => "null".to_string(),
            (_, 2 | 3) => format!("{}.{:02}", e.cents / 100, e.cents % 100),
            _ => "null".to_string(),
        };
        use std::fmt::Write as _;
        let user = if e.invalid == 4 {
            "null".to_string()
        } else {
            format!("\"{}\"", user_id(e.user))
        };
        let _ = writeln!(
            line,
            "{{\"event_id\": \"{}\", \"user_id\": {user}, \"event_type\": \"{}\", \"amount\": {amount}, \"ts\": \"{ts}\"}}",
            event_id(seed, e.id),
            KINDS[e.kind as usize]
        );
        w.write_all(line.as_bytes())?;
    }
    w.flush()
}

/// The records as Arrow batches of the event schema (nullable, so invalid rows can be written):
/// rule 3 and 5 records become rows with a null `ts`.
pub fn to_batches(records: &[GenEvent], seed: u64, batch_rows: usize) -> Vec<RecordBatch> {
    let schema = Arc::new(arrow::datatypes::Schema::new(
        event_schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    records
        .chunks(batch_rows.max(1))
        .map(|chunk| {
            let mut id = StringBuilder::with_capacity(chunk.len(), chunk.len() * 20);
            let mut user = StringBuilder::with_capacity(chunk.len(), chunk.len() * 8);
            let mut kind = StringBuilder::with_capacity(chunk.len(), chunk.len() * 8);
            let mut amount = Float64Builder::with_capacity(chunk.len());
            let mut ts =
                TimestampMillisecondBuilder::with_capacity(chunk.len()).with_timezone("UTC");
            for e in chunk {
                id.append_value(event_id(seed, e.id));
                if e.invalid == 4 {
                    user.append_null();
                } else {
                    user.append_value(user_id(e.user));
                }
                kind.append_value(KINDS[e.kind as usize]);
                let cents = e.cents as f64 / 100.0;
                match (e.invalid, e.kind) {
                    (1, _) => amount.append_value(-cents),
                    (2, _) => amount.append_null(),
                    (_, 2 | 3) => amount.append_value(cents),
                    _ => amount.append_null(),
                }
                if matches!(e.invalid, 3 | 5) {
                    ts.append_null();
                } else {
                    ts.append_value(e.ts);
                }
            }
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(id.finish()),
                    Arc::new(user.finish()),
                    Arc::new(kind.finish()),
                    Arc::new(amount.finish()),
                    Arc::new(ts.finish()),
                ],
            )
            .expect("columns match the schema")
        })
        .collect()
}

/// Writes records as one Parquet file.
pub fn write_parquet<W: Write + Send>(
    records: &[GenEvent],
    seed: u64,
    w: W,
) -> parquet::errors::Result<()> {
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let batches = to_batches(records, seed, 1 << 20);
    let schema = batches.first().map(|b| b.schema()).unwrap_or_else(|| {
        to_batches(&[], seed, 1)
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(event_schema)
    });
    let mut writer = parquet::arrow::ArrowWriter::try_new(w, schema, Some(props))?;
    for b in &batches {
        writer.write(b)?;
    }
    writer.close()?;
    Ok(())
}

fn format_with_offset(ts: i64, offset_min: i64) -> String {
    let local = ts + offset_min * MINUTE_MS;
    let days = local.div_euclid(DAY_MS);
    let rem = local.rem_euclid(DAY_MS);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, ms) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    let zone = if offset_min == 0 {
        "Z".to_string()
    } else {
        let sign = if offset_min < 0 { '-' } else { '+' };
        let a = offset_min.abs();
        format!("{sign}{:02}:{:02}", a / 60, a % 60)
    };
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}{zone}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{JsonLinesDecoder, parse_json_event};

    #[test]
    fn deterministic_with_the_golden_character() {
        let opts = GenerateOptions::new(200, 30, 1_790_000_000_000, 7);
        let a = generate(&opts);
        let b = generate(&opts);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.id == y.id && x.ts == y.ts));
        let mut buf = Vec::new();
        write_jsonl(&a, 7, &mut buf).unwrap();
        let mut d = JsonLinesDecoder::new("gen", 4096);
        d.decode(&buf);
        let total = a.len() as f64;
        let invalid = d.invalid.total() as f64 / total;
        assert!((0.0005..0.005).contains(&invalid), "invalid rate {invalid}");
        let ids: std::collections::HashSet<_> = buf
            .split(|c| *c == b'\n')
            .filter_map(|l| parse_json_event(l).ok().map(|e| e.event_id.to_string()))
            .collect();
        let dup = 1.0 - ids.len() as f64 / d.valid as f64;
        assert!((0.005..0.02).contains(&dup), "duplicate rate {dup}");
        // Disorder is bounded.
        let mut max_seen = i64::MIN;
        for e in a.iter().filter(|e| e.invalid == 0) {
            assert!(e.ts > max_seen.saturating_sub(MAX_DISORDER_MS));
            max_seen = max_seen.max(e.ts);
        }
        assert_eq!(format_with_offset(0, 330), "1970-01-01T05:30:00.000+05:30");
    }
}
