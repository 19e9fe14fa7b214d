//! The reference evaluator reproduces the golden answer from both input formats.

use std::path::PathBuf;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};
use arrow::record_batch::RecordBatch;
use duet_batch::training::{
    Engine, TrainingRequest, datafusion_training_set, reference_training_set,
};

fn golden(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name)
        .display()
        .to_string()
}

fn read(path: &str) -> RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Asserts every feature column of `got` equals `expected.parquet` (ints exactly, floats to a
/// relative 1e-9, nulls where expected).
pub fn assert_matches_expected(got: &RecordBatch) {
    let expected = read(&golden("expected.parquet"));
    assert_eq!(got.num_rows(), expected.num_rows());
    let mut checked = 0;
    for field in expected.schema().fields().iter().skip(3) {
        let name = field.name();
        let e = expected.column_by_name(name).unwrap();
        let g = got
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"));
        let mut bad = Vec::new();
        for i in 0..expected.num_rows() {
            let ok = match field.data_type() {
                arrow::datatypes::DataType::Int64 => {
                    let (e, g) = (e.as_primitive::<Int64Type>(), g.as_primitive::<Int64Type>());
                    e.is_null(i) == g.is_null(i) && (e.is_null(i) || e.value(i) == g.value(i))
                }
                _ => {
                    let (e, g) = (
                        e.as_primitive::<Float64Type>(),
                        g.as_primitive::<Float64Type>(),
                    );
                    let en = e.is_null(i) || e.value(i).is_nan();
                    let gn = g.is_null(i) || g.value(i).is_nan();
                    en == gn
                        && (en
                            || (e.value(i) - g.value(i)).abs()
                                <= 1e-9 * e.value(i).abs().max(1e-300))
                }
            };
            if !ok {
                bad.push(i);
                if bad.len() <= 3 {
                    eprintln!(
                        "{name} row {i}: expected {:?}, got {:?}",
                        arrow::util::display::array_value_to_string(e, i),
                        arrow::util::display::array_value_to_string(g, i)
                    );
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{name}: {} rows differ, first rows {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
        checked += 1;
    }
    assert_eq!(checked, 14);
}

async fn reference_run(events: &str, entities: &str) -> RecordBatch {
    engine_run(Engine::Reference, events, entities, None).await
}

async fn engine_run(
    engine: Engine,
    events: &str,
    entities: &str,
    store: Option<String>,
) -> RecordBatch {
    let spec = duet_spec::load_spec(None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rows.parquet").display().to_string();
    let req = TrainingRequest {
        entities: golden(entities),
        out: out.clone(),
        features: None,
        engine,
        events: golden(events),
        store,
    };
    let summary = match engine {
        Engine::Reference => reference_training_set(&spec, &req).await.unwrap(),
        Engine::DataFusion => datafusion_training_set(&spec, &req).await.unwrap(),
    };
    assert_eq!(summary.rows, 2000);
    assert_eq!(summary.invalid_events, 39);
    read(&out)
}

#[tokio::test(flavor = "multi_thread")]
async fn reference_reproduces_golden_from_parquet() {
    assert_matches_expected(&reference_run("events.parquet", "entities.parquet").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn reference_reproduces_golden_from_json_lines_and_csv() {
    let got = reference_run("events.jsonl.gz", "entities.csv").await;
    assert_matches_expected(&got);
    // Input columns pass through unchanged, in order, before the features.
    let names: Vec<_> = got
        .schema()
        .fields()
        .iter()
        .take(4)
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["row_id", "user_id", "ts", "label"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn datafusion_reproduces_golden_from_parquet() {
    assert_matches_expected(
        &engine_run(
            Engine::DataFusion,
            "events.parquet",
            "entities.parquet",
            None,
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn datafusion_reproduces_golden_from_json_lines() {
    assert_matches_expected(
        &engine_run(Engine::DataFusion, "events.jsonl.gz", "entities.csv", None).await,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn datafusion_reads_published_snapshots() {
    use duet_batch::run::{BatchJob, backfill_instants, run_batch};
    let spec = duet_spec::load_spec(None).unwrap();
    let store = tempfile::tempdir().unwrap();
    let store_url = store.path().display().to_string();
    let entities = read(&golden("entities.parquet"));
    let ts = entities
        .column_by_name("ts")
        .unwrap()
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    let (lo, hi) = (
        arrow::compute::min(ts).unwrap(),
        arrow::compute::max(ts).unwrap(),
    );
    let job = BatchJob {
        events: golden("events.parquet"),
        store: store_url.clone(),
        as_of: backfill_instants(&spec, lo - 86_400_000, hi).unwrap(),
        retain: 1000,
        progress: false,
    };
    let report = run_batch(&spec, &job).await.unwrap();
    assert!(report.snapshots.len() > 30, "{}", report.snapshots.len());
    assert_eq!(report.invalid.values().sum::<u64>(), 39);
    assert!(report.duplicates > 0);
    assert_matches_expected(
        &engine_run(
            Engine::DataFusion,
            "events.parquet",
            "entities.parquet",
            Some(store_url),
        )
        .await,
    );
}
