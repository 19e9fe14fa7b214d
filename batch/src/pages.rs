//! Snapshot files encoded page by page.
//!
//! A backfill writes one Parquet snapshot per day. parquet's Arrow writer took 60 ms to encode a
//! 751k-entity snapshot of the catalog (best of 15 runs, alone on a core), about 5 ns per value,
//! and encoding was a third of a backfill's CPU. A snapshot has few column types (a UTF-8 key,
//! 64-bit integer and float features), so this module encodes them straight into Parquet pages,
//! by the format's own encodings, and hands each encoded column chunk to parquet's file writer,
//! which lays out the row groups and writes the footer (the Arrow schema included, as
//! parquet's Arrow writer does). parquet's reader (the tests), pyarrow and DuckDB (checked by
//! hand) read back exactly the batch written.
//!
//! Per column chunk (data pages of format v1, nothing compressed, no statistics):
//! - a string column is prefix-encoded (`DELTA_BYTE_ARRAY`): sorted keys share their prefixes;
//! - an integer column is delta-encoded (`DELTA_BINARY_PACKED`);
//! - a float column chunk whose first 4096 values hold at most 64 distinct ones takes a
//!   dictionary (`RLE_DICTIONARY`: a rate that is mostly 0, a rounded rank), unless the chunk
//!   turns out to hold more than [`MAX_DICTIONARY`] distinct values; other float column chunks
//!   are written plain;
//! - definition levels (optional columns) are one run when a page has no null or only nulls,
//!   else the column's validity bits as they are, bit-packed.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::{ArrowSchemaConverter, add_encoded_arrow_schema_to_metadata};
use parquet::basic::{Compression, Encoding, PageType};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::{ColumnChunkMetaData, PageEncodingStats};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::{SerializedFileWriter, SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

use crate::{Error, Result};

/// Rows per row group (parquet's Arrow writer's default).
const ROW_GROUP_ROWS: usize = 1 << 20;
/// Rows per data page: about 1 MB of plain floats, parquet's default page size.
const PAGE_ROWS: usize = 1 << 17;
/// Most bytes of strings per data page, 1 MiB (unless one string is longer).
const PAGE_BYTES: usize = 1 << 20;
/// Most distinct values a float column chunk's dictionary takes before the chunk is written
/// plain instead.
const MAX_DICTIONARY: usize = 1 << 16;

fn failed(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("cannot encode a snapshot as Parquet: {e}"))
}

/// A snapshot's rows as a Parquet file (see the module's documentation).
pub fn encode_file(batch: &RecordBatch) -> Result<Vec<u8>> {
    encode_in(batch, ROW_GROUP_ROWS, PAGE_ROWS)
}

/// [`encode_file`] with at most `group_rows` rows per row group and `page_rows` per page.
fn encode_in(batch: &RecordBatch, group_rows: usize, page_rows: usize) -> Result<Vec<u8>> {
    let schema = batch.schema();
    let mut props = WriterProperties::builder()
        .set_compression(Compression::UNCOMPRESSED)
        .set_statistics_enabled(EnabledStatistics::None)
        .build();
    add_encoded_arrow_schema_to_metadata(&schema, &mut props);
    let parquet_schema = ArrowSchemaConverter::new()
        .convert(&schema)
        .map_err(failed)?;
    let mut out = Vec::with_capacity(batch.get_array_memory_size() / 2);
    let mut file =
        SerializedFileWriter::new(&mut out, parquet_schema.root_schema_ptr(), Arc::new(props))
            .map_err(failed)?;
    let mut scratch = Scratch::default();
    let mut start = 0;
    while start < batch.num_rows() {
        let rows = group_rows.min(batch.num_rows() - start);
        let mut group = file.next_row_group().map_err(failed)?;
        for (i, column) in batch.columns().iter().enumerate() {
            let (chunk, close) = encode_chunk(
                parquet_schema.column(i),
                &column.slice(start, rows),
                page_rows,
                &mut scratch,
            )
            .map_err(|e| match e {
                Error::Internal(why) => {
                    Error::Internal(format!("{why} (column {})", schema.field(i).name()))
                }
                e => e,
            })?;
            group.append_column(&chunk, close).map_err(failed)?;
        }
        group.close().map_err(failed)?;
        start += rows;
    }
    file.close().map_err(failed)?;
    Ok(out)
}

/// Buffers reused from one page to the next.
#[derive(Default)]
struct Scratch {
    ints: Vec<i64>,
    lengths: Vec<i64>,
    indices: Vec<u32>,
    ranges: Vec<(usize, usize)>,
}

/// How a column chunk's values are encoded.
enum Values {
    Strings,
    Ints,
    Floats,
    /// Floats by index into a dictionary: per row, its value's index (0 for a null).
    Dictionary(Vec<u32>, Vec<f64>),
}

/// One column chunk, encoded: its bytes and what the row group records of it.
fn encode_chunk(
    descr: ColumnDescPtr,
    column: &ArrayRef,
    page_rows: usize,
    s: &mut Scratch,
) -> Result<(Bytes, ColumnCloseResult)> {
    let rows = column.len();
    let optional = descr.max_def_level() > 0;
    let values = match column.data_type() {
        DataType::Utf8 => Values::Strings,
        DataType::Int64 => Values::Ints,
        DataType::Float64 => {
            let floats = column.as_primitive::<Float64Type>();
            match dictionary(floats) {
                Some((indices, entries)) => Values::Dictionary(indices, entries),
                None => Values::Floats,
            }
        }
        other => return Err(failed(format!("a column of type {other} is not supported"))),
    };
    let mut sink = TrackedWrite::new(Vec::with_capacity(rows * 9 + 1024));
    let encoding = match values {
        Values::Strings => Encoding::DELTA_BYTE_ARRAY,
        Values::Ints => Encoding::DELTA_BINARY_PACKED,
        Values::Floats => Encoding::PLAIN,
        Values::Dictionary(..) => Encoding::RLE_DICTIONARY,
    };
    let mut encodings = vec![Encoding::RLE];
    let mut data_offset = None;
    let mut data_pages = 0;
    {
        let mut pages = SerializedPageWriter::new(&mut sink);
        if let Values::Dictionary(_, entries) = &values {
            let mut buf = Vec::with_capacity(entries.len() * 8);
            for x in entries {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            let len = buf.len();
            let page = Page::DictionaryPage {
                buf: Bytes::from(buf),
                num_values: entries.len() as u32,
                encoding: Encoding::PLAIN,
                is_sorted: false,
            };
            pages
                .write_page(CompressedPage::new(page, len))
                .map_err(failed)?;
            encodings.push(Encoding::PLAIN);
        }
        encodings.push(encoding);
        let string_offsets = column.as_string_opt::<i32>().map(|s| s.value_offsets());
        let mut start = 0;
        while start < rows {
            let len = match string_offsets {
                Some(offsets) => string_page(offsets, start, page_rows),
                None => page_rows.min(rows - start),
            };
            let page = column.slice(start, len);
            let mut buf = Vec::with_capacity(len * 9 + 64);
            if optional {
                def_levels(page.nulls(), len, &mut buf);
            } else if page.null_count() > 0 {
                return Err(failed("a null in a column declared non-null"));
            }
            match &values {
                Values::Strings => strings(&page, s, &mut buf),
                Values::Ints => ints(&page, s, &mut buf),
                Values::Floats => floats(&page, &mut buf),
                Values::Dictionary(indices, entries) => {
                    s.indices.clear();
                    let here = &indices[start..start + len];
                    match any_nulls(&page) {
                        Some(nulls) => s.indices.extend(nulls.valid_indices().map(|i| here[i])),
                        None => s.indices.extend_from_slice(here),
                    }
                    let width = bit_width(entries.len().saturating_sub(1) as u64).max(1);
                    buf.push(width as u8);
                    rle_hybrid(&s.indices, width, &mut buf);
                }
            }
            let size = buf.len();
            let page = Page::DataPage {
                buf: Bytes::from(buf),
                num_values: len as u32,
                encoding,
                def_level_encoding: Encoding::RLE,
                rep_level_encoding: Encoding::RLE,
                statistics: None,
            };
            let spec = pages
                .write_page(CompressedPage::new(page, size))
                .map_err(failed)?;
            data_offset.get_or_insert(spec.offset);
            data_pages += 1;
            start += len;
        }
        pages.close().map_err(failed)?;
    }
    let bytes = Bytes::from(sink.into_inner().map_err(failed)?);
    let total = bytes.len() as i64;
    let dictionary_offset = matches!(values, Values::Dictionary(..)).then_some(0);
    // Which pages are encoded how: readers learn that every data page of a chunk with a
    // dictionary uses it.
    let mut stats = Vec::new();
    if dictionary_offset.is_some() {
        stats.push(PageEncodingStats {
            page_type: PageType::DICTIONARY_PAGE,
            encoding: Encoding::PLAIN,
            count: 1,
        });
    }
    stats.push(PageEncodingStats {
        page_type: PageType::DATA_PAGE,
        encoding,
        count: data_pages,
    });
    let metadata = ColumnChunkMetaData::builder(descr)
        .set_encodings(encodings)
        .set_compression(Compression::UNCOMPRESSED)
        .set_num_values(rows as i64)
        .set_total_compressed_size(total)
        .set_total_uncompressed_size(total)
        .set_data_page_offset(data_offset.expect("a chunk has rows") as i64)
        .set_dictionary_page_offset(dictionary_offset)
        .set_page_encoding_stats(stats)
        .build()
        .map_err(failed)?;
    let close = ColumnCloseResult {
        bytes_written: total as u64,
        rows_written: rows as u64,
        metadata,
        bloom_filter: None,
        column_index: None,
        offset_index: None,
    };
    Ok((bytes, close))
}

/// How many strings from `start` make a page: at most `rows`, and no more than
/// [`PAGE_BYTES`] of them unless one string alone is longer.
fn string_page(offsets: &[i32], start: usize, rows: usize) -> usize {
    let end = (start + rows).min(offsets.len() - 1);
    let limit = offsets[start] as i64 + PAGE_BYTES as i64;
    // Strings from `start` up to the first that ends past the limit.
    let within = offsets[start + 1..=end].partition_point(|o| (*o as i64) <= limit);
    within.max(1)
}

/// A float column's dictionary (its distinct values by bits, in order of first appearance)
/// and each row's index into it (0 for a null). `None` when the column's values are not few:
/// more than 64 distinct ones in its first 4096 rows, or more than [`MAX_DICTIONARY`] in all;
/// and `None` when every value is null.
fn dictionary(values: &arrow::array::Float64Array) -> Option<(Vec<u32>, Vec<f64>)> {
    let mut entries: Vec<f64> = Vec::new();
    let mut index: HashMap<u64, u32, foldhash::fast::RandomState> = HashMap::default();
    let mut indices = Vec::with_capacity(values.len());
    // The index of the last value looked up: runs of one value (mostly 0) skip the hash.
    let mut last: Option<(u64, u32)> = None;
    let nulls = any_nulls(values);
    for (i, x) in values.values().iter().enumerate() {
        if nulls.is_some_and(|n| n.is_null(i)) {
            indices.push(0);
            continue;
        }
        let bits = x.to_bits();
        let at = match last {
            Some((b, at)) if b == bits => at,
            _ => {
                let next = entries.len() as u32;
                let at = *index.entry(bits).or_insert(next);
                if at == next {
                    if entries.len() == MAX_DICTIONARY || (i < 4096 && entries.len() == 64) {
                        return None;
                    }
                    entries.push(*x);
                }
                last = Some((bits, at));
                at
            }
        };
        indices.push(at);
    }
    (!entries.is_empty()).then_some((indices, entries))
}

/// An array's nulls, when it has any.
fn any_nulls(a: &dyn Array) -> Option<&NullBuffer> {
    a.nulls().filter(|n| n.null_count() > 0)
}

/// A page's definition levels (maximum level 1) in the RLE/bit-packed hybrid, behind their
/// length as v1 pages have them: one run when no value or every value is null, else the
/// validity bits as they are (bit-packed at one bit per value, least significant first).
fn def_levels(nulls: Option<&NullBuffer>, len: usize, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    match nulls {
        Some(n) if n.null_count() == len => {
            varint(out, (len as u64) << 1);
            out.push(0);
        }
        Some(n) if n.null_count() > 0 => {
            let groups = len.div_ceil(8);
            varint(out, ((groups as u64) << 1) | 1);
            let bits = n.inner().sliced();
            out.extend_from_slice(&bits.as_slice()[..groups]);
            // The last byte's bits past the page are zeros, not the next rows' validity: the
            // same rows always make the same bytes.
            if !len.is_multiple_of(8) {
                *out.last_mut().expect("a group") &= (1u8 << (len % 8)) - 1;
            }
        }
        _ => {
            varint(out, (len as u64) << 1);
            out.push(1);
        }
    }
    let size = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&size.to_le_bytes());
}

/// A page's non-null floats, plain: eight little-endian bytes each.
fn floats(page: &ArrayRef, out: &mut Vec<u8>) {
    let values = page.as_primitive::<Float64Type>().values();
    match any_nulls(page) {
        Some(nulls) => {
            for i in nulls.valid_indices() {
                out.extend_from_slice(&values[i].to_le_bytes());
            }
        }
        None if cfg!(target_endian = "little") => out.extend_from_slice(values.inner().as_slice()),
        None => {
            for x in values.iter() {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// A page's non-null integers, delta-encoded.
fn ints(page: &ArrayRef, s: &mut Scratch, out: &mut Vec<u8>) {
    let values = page.as_primitive::<Int64Type>().values();
    match any_nulls(page) {
        Some(nulls) => {
            s.ints.clear();
            s.ints.extend(nulls.valid_indices().map(|i| values[i]));
            delta_binary_packed(&s.ints, out);
        }
        None => delta_binary_packed(values, out),
    }
}

/// A page's non-null strings, prefix-encoded (`DELTA_BYTE_ARRAY`): the length of each one's
/// prefix shared with the one before, delta-encoded; then the rest of each one
/// (`DELTA_LENGTH_BYTE_ARRAY`: the lengths delta-encoded, then the bytes).
fn strings(page: &ArrayRef, s: &mut Scratch, out: &mut Vec<u8>) {
    let strings = page.as_string::<i32>();
    let (offsets, data) = (strings.value_offsets(), strings.value_data());
    // The byte ranges of the non-null strings.
    s.ranges.clear();
    match any_nulls(page) {
        Some(nulls) => s.ranges.extend(
            nulls
                .valid_indices()
                .map(|i| (offsets[i] as usize, offsets[i + 1] as usize)),
        ),
        None => s
            .ranges
            .extend(offsets.windows(2).map(|w| (w[0] as usize, w[1] as usize))),
    }
    s.ints.clear();
    s.lengths.clear();
    let mut previous: &[u8] = &[];
    for (a, b) in &s.ranges {
        let v = &data[*a..*b];
        let shared = common_prefix(previous, v);
        s.ints.push(shared as i64);
        s.lengths.push((v.len() - shared) as i64);
        previous = v;
    }
    delta_binary_packed(&s.ints, out);
    delta_binary_packed(&s.lengths, out);
    for ((a, b), shared) in s.ranges.iter().zip(&s.ints) {
        out.extend_from_slice(&data[a + *shared as usize..*b]);
    }
}

/// How many leading bytes `a` and `b` share.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("eight bytes"))
            ^ u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Values per block of `DELTA_BINARY_PACKED`, and miniblocks per block (32 values each).
const BLOCK: usize = 128;
const MINIBLOCKS: usize = 4;
const MINIBLOCK: usize = BLOCK / MINIBLOCKS;

/// `values` in `DELTA_BINARY_PACKED`: a header (block size, miniblocks per block, count,
/// first value), then per block of 128 differences between successive values, their minimum
/// and each miniblock's differences above it, bit-packed at the miniblock's width. Differences
/// wrap, as readers undo them.
fn delta_binary_packed(values: &[i64], out: &mut Vec<u8>) {
    varint(out, BLOCK as u64);
    varint(out, MINIBLOCKS as u64);
    varint(out, values.len() as u64);
    zigzag(out, values.first().copied().unwrap_or(0));
    let mut deltas = [0i64; BLOCK];
    for (block, previous) in values[values.len().min(1)..]
        .chunks(BLOCK)
        .zip(values.chunks(BLOCK))
    {
        let n = block.len();
        // `previous` starts one value before `block`: its k-th value precedes block[k].
        for ((d, x), before) in deltas.iter_mut().zip(block).zip(previous) {
            *d = x.wrapping_sub(*before);
        }
        let min = deltas[..n]
            .iter()
            .copied()
            .min()
            .expect("a block is never empty");
        zigzag(out, min);
        let mut widths = [0u32; MINIBLOCKS];
        for (m, width) in widths.iter_mut().enumerate() {
            let lo = m * MINIBLOCK;
            if lo < n {
                let max = deltas[lo..n.min(lo + MINIBLOCK)]
                    .iter()
                    .map(|d| d.wrapping_sub(min) as u64)
                    .max()
                    .expect("a miniblock is never empty");
                *width = bit_width(max);
            }
        }
        out.extend(widths.iter().map(|w| *w as u8));
        // The last miniblock is padded to its 32 values with differences of `min` (zeros).
        deltas[n..].fill(min);
        for (m, width) in widths.iter().enumerate() {
            let lo = m * MINIBLOCK;
            if lo >= n {
                break;
            }
            let mut bits = BitWriter::new(out);
            for d in &deltas[lo..lo + MINIBLOCK] {
                bits.put(d.wrapping_sub(min) as u64, *width);
            }
            bits.finish();
        }
    }
}

/// `values` (each below 2^`width`) in the RLE/bit-packed hybrid: a run of equal values that
/// still holds 8 after its first ones complete the pending bit-packed group becomes an RLE
/// run; the other values are bit-packed in groups of 8, the last group padded with zeros.
fn rle_hybrid(values: &[u32], width: u32, out: &mut Vec<u8>) {
    let value_bytes = width.div_ceil(8) as usize;
    let n = values.len();
    // Values from `packed` on wait to be bit-packed.
    let mut packed = 0;
    let mut i = 0;
    while i < n {
        let v = values[i];
        let mut j = i + 1;
        while j < n && values[j] == v {
            j += 1;
        }
        // The run's first `fill` values would complete the pending bit-packed group.
        let fill = (8 - (i - packed) % 8) % 8;
        if j - i >= fill + 8 {
            bit_packed(&values[packed..i + fill], width, out);
            varint(out, ((j - i - fill) as u64) << 1);
            out.extend_from_slice(&v.to_le_bytes()[..value_bytes]);
            packed = j;
        }
        i = j;
    }
    bit_packed(&values[packed..], width, out);
}

/// One bit-packed run of `values` (none: nothing), padded with zeros to a multiple of 8.
fn bit_packed(values: &[u32], width: u32, out: &mut Vec<u8>) {
    if values.is_empty() {
        return;
    }
    let groups = values.len().div_ceil(8);
    varint(out, ((groups as u64) << 1) | 1);
    let mut bits = BitWriter::new(out);
    for v in values {
        bits.put(*v as u64, width);
    }
    for _ in values.len()..groups * 8 {
        bits.put(0, width);
    }
    bits.finish();
}

/// Bits needed to write `x`.
fn bit_width(x: u64) -> u32 {
    64 - x.leading_zeros()
}

/// Writes values of given bit widths, least significant bit first.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    /// Bits not yet written, from the least significant; `bits` of them (always below 64).
    buffered: u64,
    bits: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter {
            out,
            buffered: 0,
            bits: 0,
        }
    }

    /// Appends the low `width` bits of `x` (no bit of `x` above them may be set).
    fn put(&mut self, x: u64, width: u32) {
        self.buffered |= x << self.bits;
        let bits = self.bits + width;
        if bits >= 64 {
            self.out.extend_from_slice(&self.buffered.to_le_bytes());
            // The bits of `x` that did not fit.
            self.buffered = if self.bits == 0 {
                0
            } else {
                x >> (64 - self.bits)
            };
            self.bits = bits - 64;
        } else {
            self.bits = bits;
        }
    }

    /// Writes the bits still buffered, the last byte padded with zeros.
    fn finish(self) {
        let bytes = self.bits.div_ceil(8) as usize;
        self.out
            .extend_from_slice(&self.buffered.to_le_bytes()[..bytes]);
    }
}

/// `x` as a ULEB128 varint.
fn varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

/// `x` zigzag-encoded, as a varint.
fn zigzag(out: &mut Vec<u8>, x: i64) {
    varint(out, ((x << 1) ^ (x >> 63)) as u64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use proptest::prelude::*;

    /// Reads a file back whole, and the encodings of each column's first chunk.
    fn read_back(bytes: Vec<u8>, schema: &Arc<Schema>) -> (RecordBatch, Vec<Vec<Encoding>>) {
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes)).unwrap();
        assert_eq!(reader.schema().as_ref(), schema.as_ref());
        let encodings = match reader.metadata().row_groups().first() {
            Some(g) => g
                .columns()
                .iter()
                .map(|c| c.encodings().collect())
                .collect(),
            None => Vec::new(),
        };
        let batches: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        (
            arrow::compute::concat_batches(schema, &batches).unwrap(),
            encodings,
        )
    }

    /// Column by column, bit for bit (NaNs and signed zeros included).
    fn assert_same(read: &RecordBatch, written: &RecordBatch) {
        assert_eq!(read.num_rows(), written.num_rows());
        for (i, (r, w)) in read.columns().iter().zip(written.columns()).enumerate() {
            let nulls = |a: &ArrayRef| a.nulls().filter(|n| n.null_count() > 0).cloned();
            assert_eq!(nulls(r), nulls(w), "column {i}");
            match w.data_type() {
                DataType::Float64 => {
                    let bits = |a: &ArrayRef| -> Vec<Option<u64>> {
                        a.as_primitive::<Float64Type>()
                            .iter()
                            .map(|x| x.map(f64::to_bits))
                            .collect()
                    };
                    assert_eq!(bits(r), bits(w), "column {i}");
                }
                _ => assert_eq!(r, w, "column {i}"),
            }
        }
    }

    fn with_nulls<T: Clone>(values: Vec<T>, pattern: u8, seed: &[bool]) -> Vec<Option<T>> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| match pattern {
                0 => Some(v),
                1 => None,
                _ => seed[i % seed.len()].then_some(v),
            })
            .collect()
    }

    fn float() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(-0.0),
            Just(f64::INFINITY),
            (0u32..5).prop_map(|x| x as f64 / 4.0),
        ]
    }

    fn int() -> impl Strategy<Value = i64> {
        prop_oneof![
            any::<i64>(),
            Just(i64::MIN),
            Just(i64::MAX),
            -3i64..4,
            0i64..100_000
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof!["u[0-9]{0,9}", "", "[a-c]{0,3}é[0-9]{0,2}", "[ -~]{0,40}"]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever the values, nulls, row groups and pages, a reader gets back exactly the
        /// batch written.
        #[test]
        fn files_read_back_as_written(
            rows in 0usize..300,
            group_rows in 1usize..120,
            page_rows in 1usize..50,
            sorted in any::<bool>(),
            keys in proptest::collection::vec(key(), 300),
            ints in proptest::collection::vec(int(), 300),
            floats in proptest::collection::vec(float(), 300),
            few_runs in proptest::collection::vec((0usize..4, 1usize..40), 1..40),
            patterns in proptest::collection::vec(0u8..3, 4),
            seed in proptest::collection::vec(any::<bool>(), 1..40),
        ) {
            // Runs of four values, repeated to 300: dictionary indices in RLE runs of every
            // length, and bit-packed between them.
            let four = [0.0, 0.5, -1.0, f64::NAN];
            let few: Vec<f64> = few_runs
                .iter()
                .flat_map(|(v, n)| std::iter::repeat_n(four[*v], *n))
                .cycle()
                .take(300)
                .collect();
            let mut keys = keys[..rows].to_vec();
            if sorted {
                keys.sort();
            }
            let schema = Arc::new(Schema::new(vec![
                Field::new("user_id", DataType::Utf8, false),
                Field::new("label", DataType::Utf8, true),
                Field::new("count", DataType::Int64, true),
                Field::new("amount", DataType::Float64, true),
                Field::new("rate", DataType::Float64, true),
            ]));
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(keys.clone())),
                    Arc::new(StringArray::from(with_nulls(keys, patterns[0], &seed))),
                    Arc::new(Int64Array::from(with_nulls(ints[..rows].to_vec(), patterns[1], &seed))),
                    Arc::new(Float64Array::from(with_nulls(floats[..rows].to_vec(), patterns[2], &seed))),
                    Arc::new(Float64Array::from(with_nulls(few[..rows].to_vec(), patterns[3], &seed))),
                ],
            )
            .unwrap();
            let bytes = encode_in(&batch, group_rows, page_rows).unwrap();
            let (read, encodings) = read_back(bytes, &schema);
            assert_same(&read, &batch);
            if rows > 0 {
                prop_assert!(encodings[0].contains(&Encoding::DELTA_BYTE_ARRAY));
                prop_assert!(encodings[2].contains(&Encoding::DELTA_BINARY_PACKED));
                // Four values and nulls: a dictionary, unless the first chunk is all nulls.
                let first = group_rows.min(rows);
                if batch.column(4).slice(0, first).null_count() < first {
                    prop_assert!(encodings[4].contains(&Encoding::RLE_DICTIONARY), "{:?}", encodings[4]);
                }
            }
        }
    }

    /// Long runs and long mixed stretches in one page, on parquet's own page and group sizes:
    /// the RLE and bit-packed runs of definition levels and dictionary indices.
    #[test]
    fn long_runs_and_large_pages_read_back() {
        let n = 300_000;
        let rate: Vec<Option<f64>> = (0..n)
            .map(|i| match i {
                _ if i % 1000 < 500 => Some(0.0),
                _ if i % 7 == 0 => None,
                _ => Some((i % 3) as f64),
            })
            .collect();
        let amount: Vec<Option<f64>> = (0..n)
            .map(|i| (i < 150_000 || i % 5 != 0).then_some(i as f64 * 0.37))
            .collect();
        let count: Vec<Option<i64>> = (0..n)
            .map(|i| (i % 11 != 3).then_some(i as i64 * 1_000_003 % 977))
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("rate", DataType::Float64, true),
            Field::new("amount", DataType::Float64, true),
            Field::new("count", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("user-{i:08}")),
                )),
                Arc::new(Float64Array::from(rate)),
                Arc::new(Float64Array::from(amount)),
                Arc::new(Int64Array::from(count)),
            ],
        )
        .unwrap();
        let (read, encodings) = read_back(encode_file(&batch).unwrap(), &schema);
        assert_same(&read, &batch);
        assert!(encodings[1].contains(&Encoding::RLE_DICTIONARY));
        assert!(encodings[2].contains(&Encoding::PLAIN));
        // A slice starting mid-byte: validity bits not aligned to a byte.
        let sliced = batch.slice(3, n - 10);
        let (read, _) = read_back(encode_in(&sliced, 100_000, 7_000).unwrap(), &schema);
        assert_same(&read, &sliced);
    }

    /// The format's own example of `DELTA_BINARY_PACKED`, and differences that wrap.
    #[test]
    fn delta_binary_packed_bytes() {
        let mut out = Vec::new();
        delta_binary_packed(&[7, 5, 3, 1, 2, 3, 4, 5], &mut out);
        // Header: 128 per block, 4 miniblocks, 8 values, first value 7 (zigzag 14); the block:
        // minimum difference -2 (zigzag 3), widths 2, 0, 0, 0, then 32 two-bit differences
        // above -2: 0, 0, 0, 3, 3, 3, 3, then zeros.
        let mut want = vec![0x80, 0x01, 4, 8, 14, 3, 2, 0, 0, 0];
        want.extend([0b1100_0000, 0b0011_1111]);
        want.extend([0; 6]);
        assert_eq!(out, want);
        // i64::MIN, i64::MAX, i64::MIN: differences -1 and 1 (both wrapped), minimum -1
        // (zigzag 1), so 0 and 2 at two bits each.
        out.clear();
        delta_binary_packed(&[i64::MIN, i64::MAX, i64::MIN], &mut out);
        let mut want = vec![0x80, 0x01, 4, 3];
        want.extend([0xff; 9]);
        want.extend([0x01, 1, 2, 0, 0, 0, 0b0000_1000]);
        want.extend([0; 7]);
        assert_eq!(out, want);
    }

    #[test]
    fn rle_hybrid_runs() {
        let mut out = Vec::new();
        // Three values to pack, then a run of 20 sevens: 5 of them complete the packed group,
        // 15 make an RLE run.
        let mut values = vec![1, 2, 3];
        values.extend([7; 20]);
        rle_hybrid(&values, 3, &mut out);
        assert_eq!(out[0], (1 << 1) | 1, "one bit-packed group");
        // 1, 2, 3, 7, 7, 7, 7, 7 at three bits each, least significant first.
        let packed: u32 = [1u32, 2, 3, 7, 7, 7, 7, 7]
            .iter()
            .enumerate()
            .map(|(i, v)| v << (3 * i))
            .sum();
        assert_eq!(&out[1..4], &packed.to_le_bytes()[..3]);
        assert_eq!(&out[4..], &[15 << 1, 7]);
        // A run of 13 after three values: 5 complete the group, 8 are left for an RLE run.
        out.clear();
        let mut values = vec![1, 2, 3];
        values.extend([7; 13]);
        rle_hybrid(&values, 3, &mut out);
        assert_eq!(out[0], (1 << 1) | 1);
        assert_eq!(&out[4..], &[8 << 1, 7]);
        // A run of 12: 4 would be left, too few for a run; all 15 values are bit-packed.
        out.clear();
        rle_hybrid(&values[..15], 3, &mut out);
        assert_eq!(out[0], (2 << 1) | 1, "two bit-packed groups");
        assert_eq!(out.len(), 1 + 2 * 3);
    }

    /// Dictionaries wider than a byte (two-byte RLE values), and a chunk that outgrows the
    /// dictionary and is written plain.
    #[test]
    fn wide_dictionaries_and_the_plain_fallback() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Float64, true)]));
        for (distinct, dictionary) in [(20_000, true), (MAX_DICTIONARY + 5_000, false)] {
            // 4096 zeros (the first values look few), the distinct values with a null every
            // 97th row, then a run of the last one (a high index).
            let mut values: Vec<Option<f64>> = vec![Some(0.0); 4096];
            values.extend((1..=distinct).map(|i| (i % 97 != 0).then_some(i as f64 * 0.5)));
            values.extend(std::iter::repeat_n(Some(distinct as f64 * 0.5), 300));
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(Float64Array::from(values))])
                    .unwrap();
            let (read, encodings) = read_back(encode_file(&batch).unwrap(), &schema);
            assert_same(&read, &batch);
            assert_eq!(
                encodings[0].contains(&Encoding::RLE_DICTIONARY),
                dictionary,
                "{distinct} distinct values: {:?}",
                encodings[0]
            );
        }
    }

    /// The same rows make the same bytes, whatever rows follow them in the arrays.
    #[test]
    fn the_same_rows_make_the_same_bytes() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let file = |tail: Option<i64>| {
            let mut values: Vec<Option<i64>> = (0..10).map(|i| (i % 3 != 0).then_some(i)).collect();
            values.extend([tail; 6]);
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values))])
                    .unwrap();
            encode_file(&batch.slice(0, 10)).unwrap()
        };
        assert_eq!(file(None), file(Some(1)));
    }

    #[test]
    fn string_pages_hold_at_most_a_megabyte_unless_one_string_is_longer() {
        let mb = PAGE_BYTES as i32;
        // Strings of 0.4 MB, 0.4 MB, 0.4 MB, 3 MB, 1 byte.
        let offsets = [
            0,
            2 * mb / 5,
            4 * mb / 5,
            6 * mb / 5,
            6 * mb / 5 + 3 * mb,
            6 * mb / 5 + 3 * mb + 1,
        ];
        assert_eq!(string_page(&offsets, 0, 100), 2);
        assert_eq!(string_page(&offsets, 2, 100), 1);
        assert_eq!(
            string_page(&offsets, 3, 100),
            1,
            "one string past the limit"
        );
        assert_eq!(string_page(&offsets, 4, 100), 1);
        assert_eq!(string_page(&offsets, 0, 1), 1, "the row limit");
        // Read back across such pages.
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false)]));
        let big: Vec<String> = (0..5).map(|i| format!("{i}").repeat(400_000)).collect();
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(big))]).unwrap();
        let (read, _) = read_back(encode_file(&batch).unwrap(), &schema);
        assert_same(&read, &batch);
    }

    #[test]
    fn unsupported_columns_are_refused_by_name() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "flag",
            DataType::Boolean,
            true,
        )]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(arrow::array::BooleanArray::from(vec![true]))],
        )
        .unwrap();
        let e = encode_file(&batch).unwrap_err().to_string();
        assert!(e.contains("flag") && e.contains("Boolean"), "{e}");
    }
}
