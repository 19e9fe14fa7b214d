//! The batch side: each batch view's newest snapshot, held in memory in a compact columnar
//! form and swapped atomically when a newer one is published.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{Float64Type, Int64Type};
use duet_batch::publish::{Manifest, latest_manifest, latest_manifest_until, read_snapshot};
use duet_batch::store::Location;
use duet_spec::{Value, ValueType, View};
use tokio::sync::watch;

use crate::api::Stamp;
use crate::{Error, Result};

/// How one feature of a loaded snapshot is held.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Float,
    /// Not in the snapshot's file (always null).
    Missing,
}

/// A snapshot in memory: rows by key, and each row's feature values side by side, so one
/// entity's vector is read from one or two cache lines.
pub struct LoadedSnapshot {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its as-of instant, as the responses' time stamps write it.
    pub stamp: Stamp,
    rows: KeyIndex,
    kinds: Vec<Kind>,
    /// Words per row: the presence bits of the features, then one value per feature (the bits
    /// of an `i64` or an `f64`).
    width: usize,
    cells: Vec<u64>,
    /// Approximate heap bytes held.
    pub bytes: usize,
}

impl LoadedSnapshot {
    /// Builds the in-memory form of a snapshot's rows for `view`'s features.
    pub fn build(
        view: &View,
        manifest: Manifest,
        batches: &[RecordBatch],
    ) -> Result<LoadedSnapshot> {
        let features = view.features.len();
        let mask_words = features.div_ceil(64);
        let width = mask_words + features;
        let Some(schema) = batches.first().map(|b| b.schema()) else {
            return Ok(LoadedSnapshot {
                stamp: Stamp::new(&manifest.as_of),
                manifest,
                rows: KeyIndex::build(&StringArray::from(Vec::<&str>::new()))?,
                kinds: vec![Kind::Missing; features],
                width,
                cells: Vec::new(),
                bytes: 0,
            });
        };
        let batch = arrow::compute::concat_batches(&schema, batches)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let n = batch.num_rows();
        let rows = KeyIndex::build(batch.column(0).as_string::<i32>())?;
        let mut bytes = rows.bytes();
        let mut kinds = Vec::with_capacity(features);
        let mut cells = vec![0u64; n * width];
        for (j, f) in view.features.iter().enumerate() {
            let column = batch.column_by_name(&f.name);
            let kind = match (column, f.value_type) {
                (Some(_), ValueType::Int) => Kind::Int,
                (Some(_), ValueType::Float) => Kind::Float,
                (None, _) => Kind::Missing,
            };
            kinds.push(kind);
            let Some(c) = column else { continue };
            let (word, bit) = (j / 64, 1u64 << (j % 64));
            let mut put = |row: usize, v: Option<u64>| {
                if let Some(v) = v {
                    cells[row * width + word] |= bit;
                    cells[row * width + mask_words + j] = v;
                }
            };
            match kind {
                Kind::Int => {
                    for (row, v) in c.as_primitive::<Int64Type>().iter().enumerate() {
                        put(row, v.map(|v| v as u64));
                    }
                }
                Kind::Float => {
                    for (row, v) in c.as_primitive::<Float64Type>().iter().enumerate() {
                        put(row, v.map(f64::to_bits));
                    }
                }
                Kind::Missing => {}
            }
        }
        bytes += cells.len() * 8;
        Ok(LoadedSnapshot {
            stamp: Stamp::new(&manifest.as_of),
            manifest,
            rows,
            kinds,
            width,
            cells,
            bytes,
        })
    }

    /// Entities held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when the snapshot holds no entity.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Feature `index`'s value for `key`, or `None` when the entity is not in the snapshot.
    pub fn value(&self, key: &str, index: usize) -> Option<Value> {
        Some(self.value_at(self.row(key)?, index))
    }

    /// The row of `key`, when the entity is in the snapshot.
    pub fn row(&self, key: &str) -> Option<usize> {
        self.rows.get(key).map(|r| r as usize)
    }

    /// Feature `index`'s value in `row` (from [`LoadedSnapshot::row`]).
    pub fn value_at(&self, row: usize, index: usize) -> Value {
        let cells = &self.cells[row * self.width..(row + 1) * self.width];
        if cells[index / 64] & (1u64 << (index % 64)) == 0 {
            return Value::Null;
        }
        // The presence words come first (see `build`).
        let v = cells[self.width - self.kinds.len() + index];
        match self.kinds[index] {
            Kind::Int => Value::Int(v as i64),
            Kind::Float => Value::Float(f64::from_bits(v)),
            Kind::Missing => Value::Null,
        }
    }
}

/// Snapshots of one batch view: the newest, swapped in place, and a few older ones for
/// requests `as_of` the past.
///
/// A request as of `T` is served from the snapshot as of its cadence boundary `S`, or when none
/// was published for `S`, from the newest one before it: what a server running at `T` would
/// have held. Its age then decides whether it is stale, as for requests without `as_of`.
pub struct ViewSnapshots {
    /// The view.
    pub view: View,
    current: ArcSwapOption<LoadedSnapshot>,
    past: std::sync::Mutex<Vec<(i64, Past)>>,
    /// One past snapshot is read at a time: each takes as much memory as the current one.
    reading: tokio::sync::Semaphore,
    /// Where past snapshots are read: the runtime that made the view, so a read goes on when
    /// the request that started it has given up, and is shared by the requests that follow.
    runtime: tokio::runtime::Handle,
    /// How long "no snapshot published for this instant" (and which older one stands for it)
    /// is believed before the store is asked again.
    recheck: Duration,
    /// Past snapshots read from the store (whether or not one was published).
    pub past_reads: AtomicU64,
    /// When a poll last found the current snapshot to be the newest published.
    polled: std::sync::Mutex<Option<Instant>>,
    /// Background re-checks queued or running.
    rechecks: Arc<std::sync::atomic::AtomicUsize>,
}

/// Past snapshots kept in memory per view, besides the current one (distinct snapshots: several
/// instants can be served from one).
const PAST_KEPT: usize = 4;
/// Past snapshots of one view being read or waiting to be, at most; beyond, requests for
/// other instants are answered at once without them.
const PAST_PENDING: usize = 4;
/// Instants remembered as having no snapshot of their own, at most; beyond, the oldest is
/// forgotten.
const PAST_UNPUBLISHED: usize = 64;

/// What the view holds for one past instant.
enum Past {
    /// Being read; the outcome arrives on the channel.
    Reading(watch::Receiver<Option<Outcome>>),
    /// The snapshot published for it.
    Loaded(Arc<LoadedSnapshot>),
    /// None was published for it when the store was asked, at `since`; the newest published
    /// before it then, if any, stands for it.
    Before {
        snapshot: Option<Arc<LoadedSnapshot>>,
        since: Instant,
        /// The store is being asked again, in the background.
        rechecking: bool,
    },
}

impl Past {
    /// The snapshot the entry holds, if any.
    fn snapshot(&self) -> Option<&Arc<LoadedSnapshot>> {
        match self {
            Past::Loaded(l)
            | Past::Before {
                snapshot: Some(l), ..
            } => Some(l),
            _ => None,
        }
    }
}

/// Background re-checks of stand-ins queued or running at most, per view: they go one at a
/// time, before reads that requests wait for.
const RECHECKS: usize = 2;

/// The outcome of reading a past snapshot: the snapshot for the instant or the newest before
/// it, none at or before it, or why it failed.
type Outcome = std::result::Result<Option<Arc<LoadedSnapshot>>, String>;

/// The snapshot a request as of an explicit instant gets.
pub enum AsOf {
    /// The snapshot published for the instant, or the newest published before it when there
    /// is none for it (its `manifest.as_of_ms` tells which).
    Found(Arc<LoadedSnapshot>),
    /// None was published for it or before it.
    Unpublished,
    /// It could not be read, or not before the request's deadline: why.
    Unavailable(String),
}

impl ViewSnapshots {
    /// No snapshot loaded yet. Past snapshots will be read on the current Tokio runtime; an
    /// instant with no snapshot is believed to have none for `recheck`.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn new(view: View, recheck: Duration) -> Self {
        ViewSnapshots {
            view,
            current: ArcSwapOption::empty(),
            past: Default::default(),
            reading: tokio::sync::Semaphore::new(1),
            runtime: tokio::runtime::Handle::current(),
            recheck,
            past_reads: AtomicU64::new(0),
            polled: Default::default(),
            rechecks: Default::default(),
        }
    }

    /// The newest loaded snapshot.
    pub fn current(&self) -> Option<Arc<LoadedSnapshot>> {
        self.current.load_full()
    }

    /// Loads the newest published snapshot if it is newer than the one held; returns true when
    /// it swapped. Requests in flight keep the snapshot they started with.
    pub async fn refresh(&self, store: &Location) -> Result<bool> {
        let Some(manifest) = latest_manifest(store, &self.view.name)
            .await
            .map_err(Error::Batch)?
        else {
            return Ok(false);
        };
        if let Some(cur) = self.current.load_full()
            && cur.manifest.as_of_ms == manifest.as_of_ms
            && cur.manifest.run_id == manifest.run_id
        {
            self.mark_polled();
            return Ok(false);
        }
        // A request with `as_of` may have loaded it already, as a past snapshot (after polls
        // failed for a while): that copy is taken, not a second one loaded.
        let loaded = match self.held(&manifest) {
            Some(held) => {
                tracing::info!(view = %self.view.name, as_of = %held.manifest.as_of, entities = held.len(), bytes = held.bytes, "snapshot taken from the past snapshots held");
                held
            }
            None => {
                let loaded = self.load(store, manifest).await?;
                tracing::info!(view = %self.view.name, as_of = %loaded.manifest.as_of, entities = loaded.len(), bytes = loaded.bytes, "snapshot loaded");
                Arc::new(loaded)
            }
        };
        if let Some(old) = self.current.swap(Some(loaded)) {
            free_when_unused(old);
        }
        self.mark_polled();
        Ok(true)
    }

    /// Records that the current snapshot is the newest published, as of now.
    fn mark_polled(&self) {
        *self.polled.lock().expect("not poisoned") = Some(Instant::now());
    }

    async fn load(&self, store: &Location, manifest: Manifest) -> Result<LoadedSnapshot> {
        let batches = read_snapshot(store, &manifest)
            .await
            .map_err(Error::Batch)?;
        let view = self.view.clone();
        tokio::task::spawn_blocking(move || LoadedSnapshot::build(&view, manifest, &batches))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// The snapshot for the cadence boundary `s`: the one published for exactly `s`, or the
    /// newest published before it; the current one, a kept past one, or one read from the
    /// store.
    ///
    /// At or after the current snapshot's instant that is the current snapshot, without asking
    /// the store, while the polls that keep it the newest published succeed. Requests for the
    /// same instant share one read, which goes on in the background when they stop waiting (at
    /// `deadline`), so a later request finds it. Which snapshot stands for an instant with none
    /// of its own is asked again once `recheck` has passed (see [`ViewSnapshots::new`]), in
    /// the background while it goes on being served, so a backfilled snapshot is found. A
    /// failed read is not remembered: the next request tries again.
    pub async fn at(
        self: &Arc<Self>,
        store: &Location,
        s: i64,
        deadline: tokio::time::Instant,
    ) -> AsOf {
        if let Some(cur) = self.current()
            && (cur.manifest.as_of_ms == s
                || (cur.manifest.as_of_ms < s && self.polled_within(self.recheck * 3)))
        {
            return AsOf::Found(cur);
        }
        let mut reading = {
            let mut past = self.past.lock().expect("not poisoned");
            let now = Instant::now();
            let fresh = |at: &Instant| now.duration_since(*at) < self.recheck;
            past.retain(|(_, p)| match p {
                // One holding a snapshot goes on serving while it is asked again.
                Past::Before {
                    snapshot, since, ..
                } => snapshot.is_some() || fresh(since),
                // A read whose task ended without settling (a panic, a runtime shutting
                // down) must not hold its place among the pending ones.
                Past::Reading(rx) => rx.has_changed().is_ok(),
                Past::Loaded(_) => true,
            });
            match held_at(&past, s) {
                Some(i) => {
                    // Most recently used last: eviction takes the first.
                    let mut hit = past.remove(i);
                    let answer = match &mut hit.1 {
                        Past::Loaded(l) => Ok(AsOf::Found(l.clone())),
                        Past::Before {
                            snapshot,
                            since,
                            rechecking,
                        } => {
                            if !fresh(since) && !*rechecking && self.recheck_slot() {
                                *rechecking = true;
                                self.spawn_read(store, s, None);
                            }
                            Ok(match snapshot {
                                Some(l) => AsOf::Found(l.clone()),
                                None => AsOf::Unpublished,
                            })
                        }
                        Past::Reading(rx) => Err(rx.clone()),
                    };
                    past.push(hit);
                    match answer {
                        Ok(found) => return found,
                        Err(rx) => rx,
                    }
                }
                None => {
                    let pending = past
                        .iter()
                        .filter(|(_, p)| matches!(p, Past::Reading(_)))
                        .count();
                    if pending >= PAST_PENDING {
                        return AsOf::Unavailable(format!(
                            "{pending} past snapshots of view `{}` are already being read",
                            self.view.name
                        ));
                    }
                    let (tx, rx) = watch::channel(None);
                    past.push((s, Past::Reading(rx.clone())));
                    self.spawn_read(store, s, Some(tx));
                    rx
                }
            }
        };
        // The outcome, cloned out of the channel: `None` when the read was dropped without one.
        let waited: std::result::Result<Option<Outcome>, _> =
            tokio::time::timeout_at(deadline, reading.wait_for(|o| o.is_some()))
                .await
                .map(|r| r.ok().map(|o| o.clone().expect("waited for Some")));
        match waited {
            Ok(Some(Ok(Some(l)))) => AsOf::Found(l),
            Ok(Some(Ok(None))) => AsOf::Unpublished,
            Ok(Some(Err(e))) => AsOf::Unavailable(e),
            // The read was dropped without an outcome (its runtime is shutting down); the
            // next lookup forgets its entry.
            Ok(None) => AsOf::Unavailable("the read of the snapshot was abandoned".into()),
            Err(_) => AsOf::Unavailable(
                "not read before the request's deadline (--snapshot-load-timeout-ms); the read goes on"
                    .into(),
            ),
        }
    }

    /// Reads the snapshot for `s`, or the newest before it, on the view's runtime, records
    /// the outcome and sends it on `tx`. Reads go one at a time, each up to its outcome's
    /// record, so a read finds what the one before it loaded.
    fn spawn_read(
        self: &Arc<Self>,
        store: &Location,
        s: i64,
        tx: Option<watch::Sender<Option<Outcome>>>,
    ) {
        let (this, store) = (self.clone(), store.clone());
        // A background re-check gives its slot back however its task ends.
        let slot = tx.is_none().then(|| RecheckSlot(self.rechecks.clone()));
        self.runtime.spawn(async move {
            let _slot = slot;
            let outcome = match this.reading.acquire().await {
                Ok(_permit) => {
                    let outcome = this.read_past(&store, s).await;
                    if !this.settle(s, &outcome)
                        && let Ok(Some(l)) = &outcome
                    {
                        // Not kept: whoever it is sent to may hold it last.
                        free_when_unused(l.clone());
                    }
                    outcome
                }
                Err(e) => Err(format!("cannot read: {e}")),
            };
            if let Some(tx) = tx {
                let _ = tx.send(Some(outcome));
            }
        });
    }

    /// Takes a slot for a background re-check, if one of [`RECHECKS`] is free.
    fn recheck_slot(&self) -> bool {
        self.rechecks
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < RECHECKS).then_some(n + 1)
            })
            .is_ok()
    }

    /// The snapshot for `s` or the newest before it: one already held, or loaded.
    async fn read_past(&self, store: &Location, s: i64) -> Outcome {
        self.past_reads.fetch_add(1, Ordering::Relaxed);
        let manifest = latest_manifest_until(store, &self.view.name, s)
            .await
            .map_err(|e| e.to_string())?;
        let Some(manifest) = manifest else {
            return Ok(None);
        };
        if let Some(l) = self.held(&manifest) {
            return Ok(Some(l));
        }
        let loaded = self
            .load(store, manifest)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(view = %self.view.name, as_of = %loaded.manifest.as_of, entities = loaded.len(), bytes = loaded.bytes, "past snapshot loaded");
        Ok(Some(Arc::new(loaded)))
    }

    /// The snapshot of `manifest` if it is held: the current one or a past one.
    fn held(&self, manifest: &Manifest) -> Option<Arc<LoadedSnapshot>> {
        let same = |l: &Arc<LoadedSnapshot>| {
            l.manifest.as_of_ms == manifest.as_of_ms && l.manifest.run_id == manifest.run_id
        };
        if let Some(cur) = self.current()
            && same(&cur)
        {
            return Some(cur);
        }
        let past = self.past.lock().expect("not poisoned");
        past.iter()
            .find_map(|(_, p)| p.snapshot().filter(|l| same(l)).cloned())
    }

    /// Records a read's outcome in place of the instant's entry (being read, or asked again
    /// while served), and keeps at most [`PAST_KEPT`] distinct snapshots, the least recently
    /// used going first with every entry holding it, and [`PAST_UNPUBLISHED`] instants without
    /// their own. A failed read leaves an entry that was being served as it was. Returns
    /// whether the outcome was recorded (its entry may have been evicted meanwhile).
    fn settle(&self, s: i64, outcome: &Outcome) -> bool {
        // What is dropped is freed after the lock is released (snapshots can be large).
        let mut dropped = Vec::new();
        let mut past = self.past.lock().expect("not poisoned");
        let Some(i) = held_at(&past, s) else {
            return false;
        };
        let before = past.remove(i);
        let recorded = match outcome {
            Ok(Some(l)) if l.manifest.as_of_ms == s => {
                past.push((s, Past::Loaded(l.clone())));
                dropped.push(before);
                true
            }
            Ok(l) => {
                // Logged when the stand-in is new, not at every re-check that finds it again.
                if let Some(l) = l
                    && !before.1.snapshot().is_some_and(|old| Arc::ptr_eq(old, l))
                {
                    tracing::info!(view = %self.view.name, boundary = %duet_spec::timestamp::format_ms(s), served_from = %l.manifest.as_of, "no snapshot for a past boundary: the newest before it stands for it");
                }
                let entry = Past::Before {
                    snapshot: l.clone(),
                    since: Instant::now(),
                    rechecking: false,
                };
                past.push((s, entry));
                dropped.push(before);
                dropped.extend(evict_oldest(&mut past, PAST_UNPUBLISHED, |p| {
                    matches!(p, Past::Before { .. })
                }));
                true
            }
            Err(e) => {
                tracing::warn!(view = %self.view.name, as_of_ms = s, error = %e, "cannot read a past snapshot");
                match before.1 {
                    Past::Reading(_) => dropped.push(before),
                    Past::Before {
                        snapshot, since, ..
                    } => past.push((
                        s,
                        Past::Before {
                            snapshot,
                            since,
                            rechecking: false,
                        },
                    )),
                    Past::Loaded(_) => past.push(before),
                }
                false
            }
        };
        // Every instant served from the least recently used snapshot goes, until at most
        // `PAST_KEPT` distinct ones are held.
        loop {
            let held = snapshots_by_use(&past);
            if held.len() <= PAST_KEPT {
                break;
            }
            let oldest = held.last().expect("more than PAST_KEPT").clone();
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *past)
                .into_iter()
                .partition(|(_, p)| p.snapshot().is_some_and(|l| Arc::ptr_eq(l, &oldest)));
            *past = kept;
            dropped.extend(gone);
        }
        // A dropped snapshot no entry or the current one still holds may be in a request's
        // hands: freed off the serving threads once that request is done with it.
        let current = self.current();
        let mut unheld: Vec<Arc<LoadedSnapshot>> = Vec::new();
        for (_, p) in &dropped {
            if let Some(l) = p.snapshot()
                && !past
                    .iter()
                    .any(|(_, q)| q.snapshot().is_some_and(|h| Arc::ptr_eq(h, l)))
                && !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, l))
                && !unheld.iter().any(|u| Arc::ptr_eq(u, l))
            {
                unheld.push(l.clone());
            }
        }
        drop(past);
        drop(dropped);
        for l in unheld {
            free_when_unused(l);
        }
        recorded
    }

    /// Whether a poll found the newest published snapshot held within `within`.
    fn polled_within(&self, within: Duration) -> bool {
        self.polled
            .lock()
            .expect("not poisoned")
            .is_some_and(|at| at.elapsed() <= within)
    }
}

/// Where the entry for instant `s` is.
fn held_at(past: &[(i64, Past)], s: i64) -> Option<usize> {
    past.iter().position(|(at, _)| *at == s)
}

/// The snapshots the entries hold, each once however many instants it stands for, the most
/// recently used first (entries are kept in order of use, the most recent last).
fn snapshots_by_use(past: &[(i64, Past)]) -> Vec<Arc<LoadedSnapshot>> {
    let mut held: Vec<Arc<LoadedSnapshot>> = Vec::new();
    for l in past.iter().rev().filter_map(|(_, p)| p.snapshot()) {
        if !held.iter().any(|h| Arc::ptr_eq(h, l)) {
            held.push(l.clone());
        }
    }
    held
}

/// A slot of [`RECHECKS`], given back when dropped.
struct RecheckSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for RecheckSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Removes the first entry of a kind when more than `most` are held, and returns it.
fn evict_oldest(
    past: &mut Vec<(i64, Past)>,
    most: usize,
    kind: impl Fn(&Past) -> bool,
) -> Option<(i64, Past)> {
    if past.iter().filter(|(_, p)| kind(p)).count() <= most {
        return None;
    }
    let oldest = past.iter().position(|(_, p)| kind(p))?;
    Some(past.remove(oldest))
}

/// Frees a replaced snapshot on a blocking thread once no request holds it any more. A request
/// that still held it would otherwise drop the last reference, and free millions of keys on
/// its serving thread while that thread's other connections wait. Gives up waiting after a
/// minute (a past-snapshot cache may keep it): whoever drops it last then frees it.
fn free_when_unused(old: Arc<LoadedSnapshot>) {
    tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(60);
        while Arc::strong_count(&old) > 1 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(old);
    });
}

/// A snapshot's entity keys, for lookups: each key's length (LEB128) and bytes back to back,
/// and a hash table of (row, where the key starts in the text). A bucket holds 8 bytes where a
/// map of boxed keys would hold a 24-byte entry, no key is an allocation of its own, and a
/// lookup reads the same three places (control bytes, bucket, key) as such a map.
struct KeyIndex {
    text: Vec<u8>,
    /// (row, offset of its key in `text`).
    rows: hashbrown::HashTable<(u32, u32)>,
    hasher: foldhash::fast::RandomState,
}

impl KeyIndex {
    /// Indexes `keys` by row; a key given twice finds its last row.
    fn build(keys: &StringArray) -> Result<KeyIndex> {
        let size: usize = (0..keys.len())
            .map(|i| {
                let n = keys.value_length(i) as usize;
                n + leb128_len(n)
            })
            .sum();
        if u32::try_from(size).is_err() {
            return Err(Error::Internal(format!(
                "the snapshot's entity keys take {size} bytes, more than the 4 GiB one snapshot can hold"
            )));
        }
        let mut text = Vec::with_capacity(size);
        let hasher = foldhash::fast::RandomState::default();
        let mut rows = hashbrown::HashTable::with_capacity(keys.len());
        for row in 0..keys.len() {
            let k = keys.value(row).as_bytes();
            let offset = text.len() as u32;
            push_leb128(&mut text, k.len());
            text.extend_from_slice(k);
            let hash = hasher.hash_one(k);
            match rows.find_mut(hash, |(_, o): &(u32, u32)| key_at(&text, *o) == k) {
                Some(entry) => entry.0 = row as u32,
                None => {
                    rows.insert_unique(hash, (row as u32, offset), |(_, o): &(u32, u32)| {
                        hasher.hash_one(key_at(&text, *o))
                    });
                }
            }
        }
        Ok(KeyIndex { text, rows, hasher })
    }

    /// The row of `key`.
    fn get(&self, key: &str) -> Option<u32> {
        let key = key.as_bytes();
        self.rows
            .find(self.hasher.hash_one(key), |(_, o)| {
                key_at(&self.text, *o) == key
            })
            .map(|(row, _)| *row)
    }

    /// Distinct keys.
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Heap bytes held: the text, and every bucket of the table (a power of two of them, at
    /// most 7/8 full, each 8 bytes and a control byte).
    fn bytes(&self) -> usize {
        let buckets = match self.rows.capacity() {
            0 => 0,
            c => (c * 8 / 7).next_power_of_two(),
        };
        self.text.capacity() + buckets * (8 + 1)
    }
}

/// Appends `n` in LEB128: seven bits a byte, low first, the high bit set on all but the last.
fn push_leb128(text: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        text.push((n as u8) | 0x80);
        n >>= 7;
    }
    text.push(n as u8);
}

/// Bytes of `n` in LEB128.
fn leb128_len(n: usize) -> usize {
    (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize
}

/// The key written at `offset` of a [`KeyIndex`]'s text.
fn key_at(text: &[u8], offset: u32) -> &[u8] {
    let mut at = offset as usize;
    let (mut n, mut shift) = (0usize, 0);
    loop {
        let b = text[at];
        at += 1;
        n |= usize::from(b & 0x7f) << shift;
        if b < 0x80 {
            return &text[at..at + n];
        }
        shift += 7;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn manifest() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "view": "v", "as_of": "2026-12-01T00:00:00Z", "as_of_ms": 1_796_083_200_000i64,
            "join_key": "user_id", "spec_version": 1, "spec_fingerprint": "f", "features": [],
            "rows": 3, "data": "d", "data_bytes": 0, "inputs": [], "valid_events": 0,
            "duplicates": 0, "invalid": {}, "invalid_total": 0, "run_id": "r", "duration_ms": 0,
            "created_at": "2026-12-01T00:00:00Z", "duet_version": "0"
        }))
        .unwrap()
    }

    #[test]
    fn the_key_index_counts_all_its_buckets_not_only_the_full_ones() {
        let index = |keys: Vec<String>| KeyIndex::build(&StringArray::from(keys)).unwrap();
        assert_eq!(index(Vec::new()).bytes(), 0);
        // 100,000 keys of 8 bytes need 131,072 buckets (a power of two, at most 7/8 full), each
        // 8 bytes and a control byte: 11.8 bytes per key, not 9; plus the key and its length's
        // byte.
        let big = index((0..100_000).map(|i| format!("u{i:07}")).collect());
        assert_eq!(big.bytes(), 100_000 * 9 + 131_072 * 9);
        let small = index(vec!["a".into(), "bb".into(), "ccc".into()]);
        assert_eq!(small.bytes(), 6 + 3 + 4 * 9);
    }

    #[test]
    fn the_key_index_finds_every_key_and_only_those() {
        // Lengths of one, two and three LEB128 bytes.
        let (long, longer) = ("k".repeat(200), "q".repeat(20_000));
        let keys = ["u1", "", "u10", "u1\u{0}", "é", "u10", &long, &longer];
        let index = KeyIndex::build(&StringArray::from(keys.to_vec())).unwrap();
        // `u10` twice: its last row; the empty key is a key like any other.
        assert_eq!(index.len(), 7);
        for (key, row) in [
            ("u1", 0),
            ("", 1),
            ("u1\u{0}", 3),
            ("é", 4),
            ("u10", 5),
            (&long, 6),
            (&longer, 7),
        ] {
            assert_eq!(index.get(key), Some(row), "{key:?}");
        }
        for absent in ["u", "u100", "U1", "e", " u1", &long[1..], &longer[1..]] {
            assert_eq!(index.get(absent), None, "{absent:?}");
        }
        for (n, len) in [
            (0, 1),
            (1, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u32::MAX as usize, 5),
        ] {
            let mut written = Vec::new();
            push_leb128(&mut written, n);
            assert_eq!((leb128_len(n), written.len()), (len, len), "{n}");
            // Read back: a key of `n` bytes after its length.
            if n <= 16_384 {
                written.resize(len + n, b'k');
                assert_eq!(key_at(&written, 0).len(), n, "{n}");
            }
        }
        // Keys sliced out of a larger array: the text starts at the slice's first key.
        let all = StringArray::from(vec!["x", "yy", "zzz", "w"]);
        let index = KeyIndex::build(&all.slice(1, 2)).unwrap();
        assert_eq!((index.get("yy"), index.get("zzz")), (Some(0), Some(1)));
        assert_eq!((index.get("x"), index.get("w")), (None, None));
        assert_eq!(index.text, b"\x02yy\x03zzz");
    }

    /// `wide(3)` named `v`, the view `publish` writes snapshots of.
    fn view_v() -> (View, RecordBatch) {
        let (mut view, batch) = wide(3);
        view.name = "v".into();
        (view, batch)
    }

    /// A view of `n` features alternating int and float, and a batch holding every other one.
    fn wide(n: usize) -> (View, RecordBatch) {
        let spec = duet_spec::parse_spec("catalog.toml", duet_spec::CATALOG).unwrap();
        let mut view = spec.view("user_batch").unwrap().clone();
        let template = view.features[0].clone();
        view.features = (0..n)
            .map(|j| {
                let mut f = template.clone();
                f.name = format!("f{j}");
                f.value_type = if j % 2 == 0 {
                    ValueType::Int
                } else {
                    ValueType::Float
                };
                f
            })
            .collect();
        let mut fields = vec![Field::new("user_id", DataType::Utf8, false)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["a", "b", "c"]))];
        for j in (0..n).filter(|j| j % 3 != 2) {
            let name = format!("f{j}");
            if j % 2 == 0 {
                fields.push(Field::new(&name, DataType::Int64, true));
                let base = j as i64;
                columns.push(Arc::new(Int64Array::from(vec![
                    Some(base),
                    None,
                    Some(-base),
                ])));
            } else {
                fields.push(Field::new(&name, DataType::Float64, true));
                let base = j as f64 + 0.5;
                columns.push(Arc::new(Float64Array::from(vec![
                    None,
                    Some(base),
                    Some(-base),
                ])));
            }
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        (view, batch)
    }

    #[test]
    fn every_value_null_and_missing_column_reads_back() {
        for n in [1, 8, 64, 65, 130] {
            let (view, batch) = wide(n);
            let s = LoadedSnapshot::build(&view, manifest(), &[batch]).unwrap();
            assert_eq!(s.len(), 3);
            assert_eq!(s.value("zz", 0), None, "absent entity");
            for j in 0..n {
                let got: Vec<Value> = ["a", "b", "c"]
                    .iter()
                    .map(|k| s.value(k, j).unwrap())
                    .collect();
                let want = if j % 3 == 2 {
                    vec![Value::Null; 3]
                } else if j % 2 == 0 {
                    let b = j as i64;
                    vec![Value::Int(b), Value::Null, Value::Int(-b)]
                } else {
                    let b = j as f64 + 0.5;
                    vec![Value::Null, Value::Float(b), Value::Float(-b)]
                };
                assert_eq!(got, want, "{n} features, feature {j}");
            }
        }
    }

    const DAY: i64 = 86_400_000;

    /// Publishes a snapshot of `batch` as of `as_of_ms` for view `v`.
    async fn publish(store: &Location, batch: &RecordBatch, as_of_ms: i64) {
        use duet_batch::publish::{commit, encode_snapshot, write_data};
        let bytes = encode_snapshot(batch).unwrap();
        let (data, data_bytes) = write_data(store, "v", "r", as_of_ms, bytes).await.unwrap();
        let mut m = manifest();
        m.as_of_ms = as_of_ms;
        m.as_of = duet_spec::timestamp::format_ms(as_of_ms);
        m.data = data;
        m.data_bytes = data_bytes;
        commit(store, &m).await.unwrap();
    }

    fn found(a: AsOf) -> Arc<LoadedSnapshot> {
        match a {
            AsOf::Found(s) => s,
            AsOf::Unpublished => panic!("unpublished"),
            AsOf::Unavailable(why) => panic!("unavailable: {why}"),
        }
    }

    /// Waits until no past snapshot of `s` is being read (at most 30 s).
    async fn settled(s: &ViewSnapshots) {
        for _ in 0..3000 {
            let reading = s
                .past
                .lock()
                .unwrap()
                .iter()
                .any(|(_, p)| matches!(p, Past::Reading(_)));
            if !reading {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("past snapshots still being read after 30 s");
    }

    /// Requests as of a past day share one read that outlives their wait; reads of too many
    /// days at once are refused; at most `PAST_KEPT` past snapshots stay loaded; a day with no
    /// snapshot is remembered for `recheck`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_snapshots_are_read_once_and_kept() {
        use object_store::throttle::{ThrottleConfig, ThrottledStore};
        let (view, batch) = view_v();
        let mut store = duet_batch::store::resolve("memory://past-snapshots/x").unwrap();
        let throttled = Arc::new(ThrottledStore::new(
            store.store.clone(),
            ThrottleConfig {
                wait_get_per_call: Duration::from_millis(300),
                ..Default::default()
            },
        ));
        let base = 1_796_083_200_000i64;
        for d in 0..8 {
            publish(&store, &batch, base - d * DAY).await;
        }
        store.store = throttled.clone();
        let snapshots = Arc::new(ViewSnapshots::new(view, Duration::from_millis(600)));
        let wait = || tokio::time::Instant::now() + Duration::from_millis(20);
        let reads = || snapshots.past_reads.load(Ordering::Relaxed);

        // Three requests for one day: none waits long enough, and one read serves them all.
        let (a, b, c) = tokio::join!(
            snapshots.at(&store, base - DAY, wait()),
            snapshots.at(&store, base - DAY, wait()),
            snapshots.at(&store, base - DAY, wait())
        );
        for r in [a, b, c] {
            match r {
                AsOf::Unavailable(why) => assert!(why.contains("the read goes on"), "{why}"),
                _ => panic!("read in 20 ms through a store that answers in 300"),
            }
        }
        // The read went on without them: a later request finds the snapshot.
        settled(&snapshots).await;
        let s = found(snapshots.at(&store, base - DAY, wait()).await);
        assert_eq!((s.manifest.as_of_ms, s.len()), (base - DAY, 3));
        assert_eq!(reads(), 1);

        // Four more days being read: a fifth is refused at once, naming why.
        let days = [2, 3, 4, 5].map(|d| base - d * DAY);
        let started = std::time::Instant::now();
        for d in days {
            assert!(matches!(
                snapshots.at(&store, d, wait()).await,
                AsOf::Unavailable(_)
            ));
        }
        match snapshots.at(&store, base - 6 * DAY, wait()).await {
            AsOf::Unavailable(why) => assert!(
                why.contains("4 past snapshots of view `v` are already being read"),
                "{why}"
            ),
            _ => panic!("a fifth day was read beside four"),
        }
        settled(&snapshots).await;
        assert_eq!(reads(), 5);
        // One read at a time: each makes at least two calls of 300 ms (the manifest, the
        // data), so four in turn take at least 2.4 s; side by side they would take 0.9 s.
        assert!(
            started.elapsed() >= Duration::from_millis(2400),
            "four reads in {:?}",
            started.elapsed()
        );
        // Five days were loaded and four are kept: day 1, the least recently used, is gone.
        throttled.config_mut(|c| c.wait_get_per_call = Duration::ZERO);
        for d in days {
            found(snapshots.at(&store, d, wait()).await);
        }
        assert_eq!(reads(), 5);
        let _ = snapshots.at(&store, base - DAY, wait()).await;
        settled(&snapshots).await;
        assert_eq!(reads(), 6, "day 1 was read again");

        // A day with no snapshot is served from the newest before it, and that is remembered
        // until `recheck` has passed.
        let missing = base + DAY;
        let _ = snapshots.at(&store, missing, wait()).await;
        settled(&snapshots).await;
        let stand_in = |a: AsOf| found(a).manifest.as_of_ms;
        assert_eq!(stand_in(snapshots.at(&store, missing, wait()).await), base);
        let before = reads();
        publish(&store, &batch, missing).await;
        assert_eq!(stand_in(snapshots.at(&store, missing, wait()).await), base);
        assert_eq!(reads(), before, "remembered, not read again");
        // Once `recheck` has passed, it is still served at once (within the 20 ms a request
        // waits, from a store answering in 300), while the store is asked again in the
        // background, which finds the snapshot published since.
        throttled.config_mut(|c| c.wait_get_per_call = Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(stand_in(snapshots.at(&store, missing, wait()).await), base);
        let asked = std::time::Instant::now();
        while stand_in(snapshots.at(&store, missing, wait()).await) != missing {
            assert!(
                asked.elapsed() < Duration::from_secs(30),
                "the snapshot published since was not found"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(reads(), before + 1);
    }

    /// Instants with no snapshot are remembered up to a bound: the oldest go first.
    #[tokio::test]
    async fn unpublished_instants_stay_bounded() {
        let (view, _) = view_v();
        let store = duet_batch::store::resolve("memory://past-snapshots-unpublished/x").unwrap();
        let snapshots = Arc::new(ViewSnapshots::new(view, Duration::from_secs(600)));
        let wait = || tokio::time::Instant::now() + Duration::from_secs(10);
        for d in 0..(PAST_UNPUBLISHED as i64 + 10) {
            assert!(matches!(
                snapshots.at(&store, d * DAY, wait()).await,
                AsOf::Unpublished
            ));
        }
        let held: Vec<i64> = snapshots
            .past
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| *at / DAY)
            .collect();
        assert_eq!(held, (10..PAST_UNPUBLISHED as i64 + 10).collect::<Vec<_>>());
        // The newest are still remembered: no read.
        let reads = snapshots.past_reads.load(Ordering::Relaxed);
        snapshots.at(&store, 20 * DAY, wait()).await;
        assert_eq!(snapshots.past_reads.load(Ordering::Relaxed), reads);
    }

    /// A failed read is answered as unavailable, naming the failure, and is not remembered.
    #[tokio::test]
    async fn a_failed_past_read_is_not_remembered() {
        let (view, batch) = view_v();
        let store = duet_batch::store::resolve("memory://past-snapshots-failing/x").unwrap();
        let day = 1_796_083_200_000i64;
        // A manifest naming a data file that is not there.
        let path = store.child(&format!(
            "snapshots/v/commits/{}.json",
            duet_batch::publish::as_of_key(day)
        ));
        let mut m = manifest();
        m.as_of_ms = day;
        m.data = "snapshots/v/runs/gone/x.parquet".into();
        object_store::ObjectStoreExt::put(
            store.store.as_ref(),
            &path,
            serde_json::to_vec(&m).unwrap().into(),
        )
        .await
        .unwrap();
        let snapshots = Arc::new(ViewSnapshots::new(view, Duration::from_secs(60)));
        let wait = || tokio::time::Instant::now() + Duration::from_secs(10);
        for reads in 1..=2 {
            match snapshots.at(&store, day, wait()).await {
                AsOf::Unavailable(why) => {
                    assert!(why.contains("runs/gone/x.parquet"), "{why}")
                }
                _ => panic!("read a snapshot whose data file is missing"),
            }
            assert_eq!(snapshots.past_reads.load(Ordering::Relaxed), reads);
        }
        // Published properly: the next request reads it.
        publish(&store, &batch, day).await;
        assert_eq!(found(snapshots.at(&store, day, wait()).await).len(), 3);
    }

    /// An instant with no snapshot of its own is served from the newest before it: the current
    /// snapshot at or after its instant, without asking the store; an older one read once and
    /// shared by the instants it stands for; none before the first. At most `PAST_KEPT`
    /// distinct snapshots stay held, however many instants they stand for.
    #[tokio::test]
    async fn an_instant_without_its_snapshot_gets_the_newest_before_it() {
        let (view, batch) = view_v();
        let store = duet_batch::store::resolve("memory://past-snapshots-before/x").unwrap();
        let base = 1_796_083_200_000i64;
        for d in [5, 3, 0] {
            publish(&store, &batch, base - d * DAY).await;
        }
        let snapshots = Arc::new(ViewSnapshots::new(view, Duration::from_secs(600)));
        assert!(snapshots.refresh(&store).await.unwrap());
        let current = snapshots.current().unwrap();
        let wait = || tokio::time::Instant::now() + Duration::from_secs(10);
        let reads = || snapshots.past_reads.load(Ordering::Relaxed);
        let at = |d: i64| snapshots.at(&store, base - d * DAY, wait());

        for d in [0, -1, -30] {
            assert!(Arc::ptr_eq(&found(at(d).await), &current), "day {d}");
        }
        assert_eq!(reads(), 0, "the current snapshot is the newest: no read");

        let d3 = found(at(3).await);
        assert_eq!(d3.manifest.as_of_ms, base - 3 * DAY);
        for d in [2, 1] {
            assert!(Arc::ptr_eq(&found(at(d).await), &d3), "day {d}");
        }
        assert_eq!(reads(), 3, "one read per instant");
        assert_eq!(found(at(4).await).manifest.as_of_ms, base - 5 * DAY);
        assert!(matches!(at(6).await, AsOf::Unpublished));
        let held = || snapshots_by_use(&snapshots.past.lock().unwrap()).len();
        assert_eq!(held(), 2, "days 3 and 5");

        // Snapshots every other day further back, asked for the days between: each stands in
        // for one instant, and the oldest holders go.
        for d in (10..=20).step_by(2) {
            publish(&store, &batch, base - d * DAY).await;
        }
        for d in (11..=19).step_by(2) {
            assert_eq!(found(at(d).await).manifest.as_of_ms, base - (d + 1) * DAY);
            assert!(held() <= PAST_KEPT);
        }
        assert_eq!(held(), PAST_KEPT);
        // The most recent is still held: answered without a read.
        let before = reads();
        assert_eq!(found(at(19).await).manifest.as_of_ms, base - 20 * DAY);
        assert_eq!(reads(), before);
    }

    /// The current snapshot answers for later instants without a read only while the polls
    /// succeed; otherwise the store is asked, and the current snapshot reused when it is the
    /// answer.
    #[tokio::test]
    async fn later_instants_ask_the_store_when_the_polls_stopped() {
        let (view, batch) = view_v();
        let store = duet_batch::store::resolve("memory://past-snapshots-polls/x").unwrap();
        let base = 1_796_083_200_000i64;
        publish(&store, &batch, base).await;
        let snapshots = Arc::new(ViewSnapshots::new(view, Duration::from_secs(600)));
        assert!(snapshots.refresh(&store).await.unwrap());
        let current = snapshots.current().unwrap();
        let wait = || tokio::time::Instant::now() + Duration::from_secs(10);
        let reads = || snapshots.past_reads.load(Ordering::Relaxed);
        let later = found(snapshots.at(&store, base + DAY, wait()).await);
        assert!(Arc::ptr_eq(&later, &current));
        assert_eq!(reads(), 0);
        // As if no poll had succeeded for longer than three poll intervals.
        *snapshots.polled.lock().unwrap() = None;
        publish(&store, &batch, base + 2 * DAY).await;
        let later = found(snapshots.at(&store, base + DAY, wait()).await);
        assert!(Arc::ptr_eq(&later, &current), "reused, not loaded again");
        assert_eq!(reads(), 1);
        let newer = found(snapshots.at(&store, base + 3 * DAY, wait()).await);
        assert_eq!(newer.manifest.as_of_ms, base + 2 * DAY);
        assert_eq!(reads(), 2);
        // A poll that succeeds again makes the past copy current (not loading a second one),
        // and restores the shortcut.
        assert!(snapshots.refresh(&store).await.unwrap());
        assert!(Arc::ptr_eq(&snapshots.current().unwrap(), &newer));
        let now_current = found(snapshots.at(&store, base + 5 * DAY, wait()).await);
        assert!(Arc::ptr_eq(&now_current, &snapshots.current().unwrap()));
        assert_eq!(reads(), 2);
    }

    #[test]
    fn an_empty_snapshot_has_no_rows() {
        let (view, _) = wide(3);
        let s = LoadedSnapshot::build(&view, manifest(), &[]).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.value("a", 0), None);
    }
}
