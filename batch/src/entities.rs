//! Entity files for training sets: Parquet or CSV rows with the join key and `ts`; every other
//! column passes through unchanged.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::RecordBatchReader;
use arrow::array::{Array, AsArray};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::store::resolve;
use crate::{Error, Result};

/// Entity rows: the file's columns, and the parsed key and time of each row.
#[derive(Debug, Clone)]
pub struct EntityRows {
    /// All input columns, unchanged, as one batch.
    pub batch: RecordBatch,
    /// The join-key value of each row.
    pub keys: Vec<String>,
    /// The time of each row, epoch milliseconds.
    pub ts: Vec<i64>,
}

/// Reads an entity file (`.parquet`, or `.csv` with a header), keyed by `join_key`.
pub async fn read_entities(url: &str, join_key: &str) -> Result<EntityRows> {
    let loc = resolve(url)?;
    let bytes = loc
        .store
        .get(&loc.prefix)
        .await
        .map_err(|e| match e {
            object_store::Error::NotFound { .. } => {
                Error::BadInput(format!("entities `{url}`: no such file"))
            }
            e => Error::Storage(format!("cannot read entities `{url}`: {e}")),
        })?
        .bytes()
        .await
        .map_err(|e| Error::Storage(format!("cannot read entities `{url}`: {e}")))?;
    let batch = if bytes.starts_with(b"PAR1") {
        read_parquet(bytes, url)?
    } else {
        read_csv(bytes, url, join_key)?
    };
    let keys_col = batch.column_by_name(join_key).ok_or_else(|| {
        Error::BadInput(format!(
            "entities `{url}`: no column `{join_key}` (the join key)"
        ))
    })?;
    let keys_text = cast(keys_col, &DataType::Utf8).map_err(|e| {
        Error::BadInput(format!(
            "entities `{url}`: column `{join_key}` is not text: {e}"
        ))
    })?;
    let keys_text = keys_text.as_string::<i32>();
    let mut keys = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        if keys_text.is_null(i) {
            return Err(Error::BadInput(format!(
                "entities `{url}`: row {} has no `{join_key}`",
                i + 1
            )));
        }
        keys.push(keys_text.value(i).to_string());
    }
    let ts_col = batch
        .column_by_name("ts")
        .ok_or_else(|| Error::BadInput(format!("entities `{url}`: no column `ts`")))?;
    let ts = row_times(ts_col, url)?;
    Ok(EntityRows { batch, keys, ts })
}

fn read_parquet(bytes: Bytes, url: &str) -> Result<RecordBatch> {
    let bad = |e: String| {
        Error::BadInput(format!(
            "entities `{url}`: not a readable Parquet file: {e}"
        ))
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| bad(e.to_string()))?
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    concat_batches(&schema, &batches).map_err(|e| bad(e.to_string()))
}

fn read_csv(bytes: Bytes, url: &str, join_key: &str) -> Result<RecordBatch> {
    let bad = |e: String| {
        Error::BadInput(format!(
            "entities `{url}`: not a readable CSV file with a header: {e}"
        ))
    };
    let format = arrow::csv::reader::Format::default().with_header(true);
    // Over every row: a column whose first rows all look like numbers but a later one does
    // not is text, where a sample would have typed it and then failed on that row.
    let (inferred, _) = format
        .infer_schema(Cursor::new(&bytes[..]), None)
        .map_err(|e| bad(e.to_string()))?;
    // The key and the time are parsed by duet's own rules, not by CSV type inference.
    let fields: Vec<Field> = inferred
        .fields()
        .iter()
        .map(|f| {
            if f.name() == join_key || f.name() == "ts" {
                Field::new(f.name(), DataType::Utf8, true)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_format(format)
        .with_batch_size(64 * 1024)
        .build(Cursor::new(bytes))
        .map_err(|e| bad(e.to_string()))?;
    let batches: Vec<RecordBatch> = reader
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    concat_batches(&schema, &batches).map_err(|e| bad(e.to_string()))
}

fn row_times(col: &Arc<dyn Array>, url: &str) -> Result<Vec<i64>> {
    let n = col.len();
    let mut out = Vec::with_capacity(n);
    let missing =
        |i: usize| Error::BadInput(format!("entities `{url}`: row {} has no `ts`", i + 1));
    match col.data_type() {
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => {
            let ms = cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None))
                .map_err(|e| Error::BadInput(format!("entities `{url}`: column `ts`: {e}")))?;
            let ms = ms.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            for i in 0..n {
                if ms.is_null(i) {
                    return Err(missing(i));
                }
                out.push(ms.value(i));
            }
        }
        DataType::Int64 => {
            let v = col.as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..n {
                if v.is_null(i) {
                    return Err(missing(i));
                }
                out.push(v.value(i));
            }
        }
        _ => {
            let text = cast(col, &DataType::Utf8)
                .map_err(|e| Error::BadInput(format!("entities `{url}`: column `ts`: {e}")))?;
            let text = text.as_string::<i32>();
            for i in 0..n {
                if text.is_null(i) {
                    return Err(missing(i));
                }
                let s = text.value(i);
                out.push(duet_spec::timestamp::parse_instant(s).ok_or_else(|| {
                    Error::BadInput(format!(
                        "entities `{url}`: row {}: `ts` value `{s}` is not RFC 3339 (such as 2026-11-20T13:45:12.123Z)",
                        i + 1
                    ))
                })?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column types are inferred from every row, not a sample: a late row that is not a number
    /// makes its column text instead of failing the read.
    #[test]
    fn csv_column_types_come_from_every_row() {
        let mut text = String::from("user_id,ts,label,note\n");
        for i in 0..20_000 {
            text.push_str(&format!("u{i},2026-09-01T00:00:00Z,{},{i}\n", i % 2));
        }
        text.push_str("late,2026-09-01T00:00:00Z,1,n/a\n");
        let batch = read_csv(Bytes::from(text), "e.csv", "user_id").unwrap();
        assert_eq!(batch.num_rows(), 20_001);
        let schema = batch.schema();
        assert_eq!(
            schema.field_with_name("label").unwrap().data_type(),
            &DataType::Int64
        );
        assert_eq!(
            schema.field_with_name("note").unwrap().data_type(),
            &DataType::Utf8
        );
        let note = batch.column_by_name("note").unwrap().as_string::<i32>();
        assert_eq!((note.value(12_345), note.value(20_000)), ("12345", "n/a"));
    }
}
