//! Where entity state lives: Redis in production, memory in unit tests and the embedded demo.
//! Every write is a compare-and-set on one key (with, when the spec keeps a `history`, an append
//! to the entity's history key, in the same hash slot), so the design holds on Redis Cluster (no
//! script spans two hash slots) and two writers can never overwrite each other's updates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use crate::{Error, Result};

/// A stored value and its version (versions start at 1 and grow by one per write).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// The version written.
    pub version: u64,
    /// The state bytes.
    pub bytes: Vec<u8>,
}

/// One conditional write.
#[derive(Debug, Clone)]
pub struct CasWrite {
    /// The key.
    pub key: String,
    /// The version the key must still hold (`None`: the key must be absent).
    pub expected: Option<u64>,
    /// The new bytes, or `None` to delete the key.
    pub value: Option<Vec<u8>>,
    /// Expiry of the new value, in milliseconds.
    pub ttl_ms: u64,
    /// Events to append to the entity's history (in its state's hash slot) in the same atomic
    /// step: appended if and only if the write applies.
    pub history: Option<HistoryWrite>,
}

/// Events to add to one entity's history (see [`crate::history`]): a string of records,
/// appended to, so a write costs Redis one append whatever the number of events.
#[derive(Debug, Clone)]
pub struct HistoryWrite {
    /// The history's key.
    pub key: String,
    /// Encoded events, as [`crate::history::Records`] writes them.
    pub records: Vec<u8>,
    /// A history created by this write starts with this header record (the instant from which
    /// it holds every event, [`crate::history::header`]).
    pub header: Vec<u8>,
    /// The key's expiry, in milliseconds from now.
    pub ttl_ms: u64,
}

/// States (`None` where absent) and history bytes (empty where absent), in the order asked.
pub type StatesAndHistories = (Vec<Option<Versioned>>, Vec<Vec<u8>>);

/// The narrow interface the speed layer and the server need from a state store.
pub trait StateStore: Send + Sync + 'static {
    /// The current values of `keys`, in order (`None` where absent).
    fn get_many(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<Option<Versioned>>>> + Send;
    /// Applies each write whose key still holds its expected version; returns, per write,
    /// whether it was applied. A write's history events are appended (a missing history
    /// created with its header first, its expiry set) with its state, atomically: both or
    /// neither.
    fn put_many(&self, writes: &[CasWrite]) -> impl Future<Output = Result<Vec<bool>>> + Send;
    /// The current values of `keys` and, in the same round trip, the bytes of each of
    /// `histories` (empty when absent; read with [`crate::history::read`]).
    fn get_many_with_history(
        &self,
        keys: &[String],
        histories: &[String],
    ) -> impl Future<Output = Result<StatesAndHistories>> + Send;
    /// Every key starting with `prefix`.
    fn keys(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Adds to named counters of a hash (best effort, for operators and the checker).
    fn add_counters(
        &self,
        hash: &str,
        counts: &[(String, i64)],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Reads a hash of counters.
    fn counters(&self, hash: &str) -> impl Future<Output = Result<HashMap<String, i64>>> + Send;
    /// Sets `key` to `value` unless it holds something else; returns what it holds after.
    fn claim(&self, key: &str, value: &str) -> impl Future<Output = Result<String>> + Send;
    /// Every field of a hash of text values.
    fn fields(&self, hash: &str) -> impl Future<Output = Result<HashMap<String, String>>> + Send;
    /// Sets fields of a hash of text values, all at once.
    fn set_fields(
        &self,
        hash: &str,
        fields: &[(String, String)],
    ) -> impl Future<Output = Result<()>> + Send;
    /// The same store through a connection of its own: calls on it do not queue behind the
    /// calls in flight on this one (the speed layer reads the next batch's states while the
    /// previous batch's writes are still on their way).
    fn own_connection(&self) -> impl Future<Output = Result<Self>> + Send
    where
        Self: Sized;
}

/// One history in the memory store: its bytes, as Redis holds them, and its expiry.
struct MemoryHistory {
    bytes: Vec<u8>,
    expiry: Instant,
}

/// A process-local store with the same semantics (including expiry).
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Default)]
struct MemoryInner {
    values: HashMap<String, (Versioned, Instant)>,
    histories: HashMap<String, MemoryHistory>,
    hashes: HashMap<String, HashMap<String, i64>>,
    text_hashes: HashMap<String, HashMap<String, String>>,
    strings: HashMap<String, String>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a state key has left to live (`None`: absent or expired).
    pub fn expires_in(&self, key: &str) -> Option<Duration> {
        let g = self.inner.lock().expect("not poisoned");
        let (_, expiry) = g.values.get(key)?;
        expiry.checked_duration_since(Instant::now())
    }

    /// Removes a state key before its expiry, as Redis does when it expires early (for
    /// fault-injection tests).
    pub fn expire(&self, key: &str) {
        self.inner.lock().expect("not poisoned").values.remove(key);
    }

    /// Overwrites a key's bytes without a version check (for fault-injection tests).
    pub fn corrupt(&self, key: &str, bytes: Vec<u8>) {
        let mut g = self.inner.lock().expect("not poisoned");
        if let Some((v, _)) = g.values.get_mut(key) {
            v.bytes = bytes;
        }
    }
}

impl StateStore for MemoryStore {
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Versioned>>> {
        let mut g = self.inner.lock().expect("not poisoned");
        let now = Instant::now();
        Ok(keys
            .iter()
            .map(|k| match g.values.get(k) {
                Some((v, exp)) if *exp > now => Some(v.clone()),
                Some(_) => {
                    g.values.remove(k);
                    None
                }
                None => None,
            })
            .collect())
    }

    async fn put_many(&self, writes: &[CasWrite]) -> Result<Vec<bool>> {
        let mut g = self.inner.lock().expect("not poisoned");
        let now = Instant::now();
        Ok(writes
            .iter()
            .map(|w| {
                let current = g
                    .values
                    .get(&w.key)
                    .filter(|(_, exp)| *exp > now)
                    .map(|(v, _)| v.version);
                if current != w.expected {
                    return false;
                }
                match &w.value {
                    Some(bytes) => {
                        let v = Versioned {
                            version: current.unwrap_or(0) + 1,
                            bytes: bytes.clone(),
                        };
                        g.values
                            .insert(w.key.clone(), (v, now + Duration::from_millis(w.ttl_ms)));
                    }
                    None => {
                        g.values.remove(&w.key);
                    }
                }
                if let Some(h) = &w.history {
                    let stored =
                        g.histories
                            .entry(h.key.clone())
                            .or_insert_with(|| MemoryHistory {
                                bytes: Vec::new(),
                                expiry: now,
                            });
                    if stored.expiry <= now {
                        stored.bytes = h.header.clone();
                    }
                    stored.bytes.extend_from_slice(&h.records);
                    stored.expiry = now + Duration::from_millis(h.ttl_ms.max(1));
                }
                true
            })
            .collect())
    }

    async fn get_many_with_history(
        &self,
        keys: &[String],
        histories: &[String],
    ) -> Result<StatesAndHistories> {
        let values = self.get_many(keys).await?;
        let g = self.inner.lock().expect("not poisoned");
        let now = Instant::now();
        let read = histories
            .iter()
            .map(|k| match g.histories.get(k) {
                Some(h) if h.expiry > now => h.bytes.clone(),
                _ => Vec::new(),
            })
            .collect();
        Ok((values, read))
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let g = self.inner.lock().expect("not poisoned");
        let now = Instant::now();
        let mut keys: Vec<String> = g
            .values
            .iter()
            .map(|(k, (_, exp))| (k, exp))
            .chain(g.histories.iter().map(|(k, h)| (k, &h.expiry)))
            .filter(|(k, exp)| k.starts_with(prefix) && **exp > now)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn add_counters(&self, hash: &str, counts: &[(String, i64)]) -> Result<()> {
        let mut g = self.inner.lock().expect("not poisoned");
        let h = g.hashes.entry(hash.to_string()).or_default();
        for (k, v) in counts {
            *h.entry(k.clone()).or_default() += v;
        }
        Ok(())
    }

    async fn counters(&self, hash: &str) -> Result<HashMap<String, i64>> {
        Ok(self
            .inner
            .lock()
            .expect("not poisoned")
            .hashes
            .get(hash)
            .cloned()
            .unwrap_or_default())
    }

    async fn claim(&self, key: &str, value: &str) -> Result<String> {
        let mut g = self.inner.lock().expect("not poisoned");
        Ok(g.strings
            .entry(key.to_string())
            .or_insert_with(|| value.to_string())
            .clone())
    }

    async fn fields(&self, hash: &str) -> Result<HashMap<String, String>> {
        Ok(self
            .inner
            .lock()
            .expect("not poisoned")
            .text_hashes
            .get(hash)
            .cloned()
            .unwrap_or_default())
    }

    async fn set_fields(&self, hash: &str, fields: &[(String, String)]) -> Result<()> {
        let mut g = self.inner.lock().expect("not poisoned");
        let h = g.text_hashes.entry(hash.to_string()).or_default();
        for (k, v) in fields {
            h.insert(k.clone(), v.clone());
        }
        Ok(())
    }

    async fn own_connection(&self) -> Result<Self> {
        Ok(self.clone())
    }
}

/// Compare-and-set on each of its keys, independently: the value is an 8-byte big-endian
/// version followed by the state (only the version is read: GETRANGE of an absent key is
/// empty); `ARGV` holds `(expected version, new value, expiry ms)` per key, an empty value
/// deleting the key. Returns 1 or 0 per key. The keys of one call always
/// share a Redis Cluster hash slot, so the script runs on Cluster too.
const CAS_SCRIPT: &str = r#"
local out = {}
for i = 1, #KEYS do
  local j = 3 * i - 2
  local ver = redis.call('GETRANGE', KEYS[i], 0, 7)
  if ver ~= ARGV[j] then
    out[i] = 0
  else
    if ARGV[j + 1] == '' then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], ARGV[j + 1], 'PX', ARGV[j + 2])
    end
    out[i] = 1
  end
end
return out
"#;

/// [`CAS_SCRIPT`] for writes that also append to their entity's history, in the same atomic
/// step: `KEYS` holds (state key, history key) pairs, of one hash slot; `ARGV` holds, per pair,
/// the state's three arguments, then (records, header, history expiry ms). A history the append
/// creates is rewritten with its header first. The history is written before the state: Redis
/// does not undo a script's earlier writes when a later command fails (a full string, a key of
/// another type), and a history with events its state lacks only repeats what readers
/// deduplicate, while a state counting events its history lacks would be wrong for good.
const CAS_HISTORY_SCRIPT: &str = r#"
local out = {}
for i = 1, #KEYS / 2 do
  local state, history = KEYS[2 * i - 1], KEYS[2 * i]
  local j = 6 * i - 5
  local ver = redis.call('GETRANGE', state, 0, 7)
  if ver ~= ARGV[j] then
    out[i] = 0
  else
    local records = ARGV[j + 3]
    if redis.call('APPEND', history, records) == #records then
      redis.call('SET', history, ARGV[j + 4] .. records, 'PX', ARGV[j + 5])
    else
      redis.call('PEXPIRE', history, ARGV[j + 5])
    end
    if ARGV[j + 1] == '' then
      redis.call('DEL', state)
    else
      redis.call('SET', state, ARGV[j + 1], 'PX', ARGV[j + 2])
    end
    out[i] = 1
  end
end
return out
"#;

/// A state as stored: its new version (8 bytes, big-endian) and then its bytes, written as one
/// command argument without first joining them in a buffer of their own.
struct Stored<'a> {
    version: u64,
    bytes: &'a [u8],
}

impl<'a> Stored<'a> {
    fn new(w: &CasWrite, bytes: &'a [u8]) -> Self {
        Stored {
            version: w.expected.unwrap_or(0) + 1,
            bytes,
        }
    }
}

impl redis::ToRedisArgs for Stored<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        arg.write_all(&self.version.to_be_bytes())
            .and_then(|()| arg.write_all(self.bytes))
            .expect("writing to a command buffer does not fail");
    }
}

/// The `EVALSHA` of [`CAS_SCRIPT`] (SHA-1 `hash`) for the writes at positions `call`, or of
/// [`CAS_HISTORY_SCRIPT`] when `with_history` (every one of those writes then has a history),
/// written into one command buffer sized up front. `redis::ScriptInvocation` would allocate
/// every key and argument on its own and then copy them all into the command.
fn cas_call(hash: &str, writes: &[CasWrite], call: &[usize], with_history: bool) -> redis::Cmd {
    let history = |i: usize| {
        let h = writes[i].history.as_ref();
        debug_assert_eq!(h.is_some(), with_history);
        h.filter(|_| with_history)
    };
    let data: usize = call
        .iter()
        .map(|&i| {
            let w = &writes[i];
            // The key, the version, the stored value and the TTL's digits; the history's key,
            // records, header and TTL.
            w.key.len()
                + 8
                + w.value.as_ref().map_or(0, |v| 8 + v.len())
                + 20
                + history(i).map_or(0, |h| h.key.len() + h.records.len() + h.header.len() + 20)
        })
        .sum();
    let per_write = if with_history { 8 } else { 4 };
    let mut cmd = redis::Cmd::with_capacity(3 + per_write * call.len(), 64 + data);
    let keys = if with_history { 2 } else { 1 } * call.len();
    cmd.arg("EVALSHA").arg(hash).arg(keys);
    for &i in call {
        cmd.arg(&writes[i].key);
        if let Some(h) = history(i) {
            cmd.arg(&h.key);
        }
    }
    for &i in call {
        let w = &writes[i];
        let expected: &[u8] = match &w.expected {
            Some(v) => &v.to_be_bytes(),
            None => &[],
        };
        cmd.arg(expected);
        match &w.value {
            Some(bytes) => cmd.arg(Stored::new(w, bytes)),
            None => cmd.arg(&[] as &[u8]),
        };
        cmd.arg(w.ttl_ms.max(1));
        if let Some(h) = history(i) {
            cmd.arg(&h.records).arg(&h.header).arg(h.ttl_ms.max(1));
        }
    }
    cmd
}

/// Most writes one compare-and-set call carries (each of them one key, or two with a history).
const CAS_KEYS_PER_CALL: usize = 64;

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the text inside the
/// first `{...}`, when not empty) or of the whole key, modulo 16384.
pub fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|b| *b == b'}')
                .filter(|close| *close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for b in tagged {
        crc ^= (*b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Where a [`RedisStore`]'s connection stands.
#[derive(Clone)]
enum Link {
    /// The first attempt to connect has not finished: calls wait for it (within their own
    /// timeouts), so the first requests after a start are not failed for nothing.
    Connecting,
    /// The first attempt failed (with this error) and retries go on in the background: calls
    /// fail at once.
    Unreachable(String),
    /// Connected; the manager reconnects by itself from here on.
    Ready(ConnectionManager),
}

/// Redis, through an auto-reconnecting connection with bounded timeouts.
#[derive(Clone)]
pub struct RedisStore {
    con: tokio::sync::watch::Receiver<Link>,
    script: Arc<redis::Script>,
    /// [`CAS_HISTORY_SCRIPT`].
    history_script: Arc<redis::Script>,
    url: String,
    timeout: Duration,
}

fn redis_err(url: &str, e: redis::RedisError) -> Error {
    Error::Redis(format!("{url}: {e}"))
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`), failing within `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<RedisStore> {
        let (client, config) = Self::client(url, timeout)?;
        let con = tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| Error::Redis(format!("{url}: no answer within {timeout:?}")))?
            .map_err(|e| redis_err(url, e))?;
        let (_, link) = tokio::sync::watch::channel(Link::Ready(con));
        let store = RedisStore {
            con: link,
            script: Arc::new(redis::Script::new(CAS_SCRIPT)),
            history_script: Arc::new(redis::Script::new(CAS_HISTORY_SCRIPT)),
            url: url.to_string(),
            timeout,
        };
        store.load_script().await?;
        Ok(store)
    }

    /// A store that connects in the background and keeps retrying. Calls made while the first
    /// attempt is under way wait for it; after it failed, calls fail at once until a retry
    /// connects (the server starts and serves batch features while Redis is down).
    pub fn connect_lazily(url: &str, timeout: Duration) -> Result<RedisStore> {
        let (client, config) = Self::client(url, timeout)?;
        let (tx, rx) = tokio::sync::watch::channel(Link::Connecting);
        let store = RedisStore {
            con: rx,
            script: Arc::new(redis::Script::new(CAS_SCRIPT)),
            history_script: Arc::new(redis::Script::new(CAS_HISTORY_SCRIPT)),
            url: url.to_string(),
            timeout,
        };
        let url = url.to_string();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                    Ok(con) => {
                        tx.send_replace(Link::Ready(con));
                        tracing::info!(%url, "connected to Redis");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "Redis unreachable; retrying");
                        tx.send_replace(Link::Unreachable(e.to_string()));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(store)
    }

    fn client(
        url: &str,
        timeout: Duration,
    ) -> Result<(redis::Client, redis::aio::ConnectionManagerConfig)> {
        let bad = |e: redis::RedisError| Error::BadInput(format!("--redis `{url}`: {e}"));
        // TCP_NODELAY, which redis-rs leaves off: with Nagle's algorithm a command written
        // while an earlier one is unacknowledged waits for that acknowledgement, which comes
        // with Redis's reply (or a delayed ACK), so requests queue behind each other's round trips.
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(bad)?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let client = redis::Client::open(info.set_tcp_settings(tcp)).map_err(bad)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        Ok((client, config))
    }

    async fn load_script(&self) -> Result<()> {
        let mut c = self.connection().await?;
        for script in [&self.script, &self.history_script] {
            script
                .prepare_invoke()
                .load_async(&mut c)
                .await
                .map_err(|e| redis_err(&self.url, e))?;
        }
        Ok(())
    }

    /// The connection; waits while the first attempt to connect is under way.
    async fn connection(&self) -> Result<ConnectionManager> {
        let not_connected =
            |why: &str| Error::Redis(format!("{}: not connected ({why})", self.url));
        if let Link::Ready(con) = &*self.con.borrow() {
            return Ok(con.clone());
        }
        let mut link = self.con.clone();
        let link = link
            .wait_for(|l| !matches!(l, Link::Connecting))
            .await
            .map_err(|_| not_connected("stopped connecting"))?;
        match &*link {
            Link::Ready(con) => Ok(con.clone()),
            Link::Unreachable(e) => Err(not_connected(&format!("{e}; retrying"))),
            Link::Connecting => Err(not_connected("still connecting")),
        }
    }

    /// The URL connected to.
    pub fn url(&self) -> &str {
        &self.url
    }
}

fn split_version(raw: Vec<u8>) -> Option<Versioned> {
    if raw.len() < 8 {
        return None;
    }
    let version = u64::from_be_bytes(raw[..8].try_into().expect("eight bytes"));
    Some(Versioned {
        version,
        bytes: raw[8..].to_vec(),
    })
}

impl StateStore for RedisStore {
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Versioned>>> {
        if keys.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.get(k);
        }
        let mut con = self.connection().await?;
        let raw: Vec<Option<Vec<u8>>> = pipe
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err(&self.url, e))?;
        Ok(raw.into_iter().map(|v| v.and_then(split_version)).collect())
    }

    async fn put_many(&self, writes: &[CasWrite]) -> Result<Vec<bool>> {
        if writes.is_empty() {
            return Ok(vec![]);
        }
        // A key that must be absent (and carries no history) is created with `SET NX`, which
        // needs no script: a fresh entity's first state costs Redis one command instead of a
        // script call's share. The other writes go in one script call per group of keys
        // sharing a hash slot, writes with a history (which share their state's slot) through
        // the script that also appends it. All of it in one pipeline.
        let mut by_slot: HashMap<(u16, bool), Vec<usize>> = HashMap::new();
        let mut creations = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            if w.expected.is_none() && w.value.is_some() && w.history.is_none() {
                creations.push(i);
            } else {
                by_slot
                    .entry((hash_slot(w.key.as_bytes()), w.history.is_some()))
                    .or_default()
                    .push(i);
            }
        }
        let calls: Vec<(&[usize], bool)> = by_slot
            .iter()
            .flat_map(|(&(_, with_history), group)| {
                group
                    .chunks(CAS_KEYS_PER_CALL)
                    .map(move |call| (call, with_history))
            })
            .collect();
        let mut pipe = redis::pipe();
        for &i in &creations {
            let w = &writes[i];
            let bytes = w.value.as_deref().expect("creations have a value");
            pipe.cmd("SET")
                .arg(&w.key)
                .arg(Stored::new(w, bytes))
                .arg("PX")
                .arg(w.ttl_ms.max(1))
                .arg("NX");
        }
        for &(call, with_history) in &calls {
            let script = if with_history {
                &self.history_script
            } else {
                &self.script
            };
            pipe.add_command(cas_call(script.get_hash(), writes, call, with_history));
        }
        let mut con = self.connection().await?;
        let replies: Vec<redis::Value> = match pipe.query_async(&mut con).await {
            Ok(a) => a,
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis restarted and forgot the scripts: load them and try once more (a creation
                // that landed the first time loses now, and is recomputed like any other).
                self.load_script().await?;
                pipe.query_async(&mut con)
                    .await
                    .map_err(|e| redis_err(&self.url, e))?
            }
            Err(e) => return Err(redis_err(&self.url, e)),
        };
        if replies.len() != creations.len() + calls.len() {
            return Err(Error::Redis(format!(
                "{}: {} replies to a pipeline of {} commands",
                self.url,
                replies.len(),
                creations.len() + calls.len()
            )));
        }
        let mut applied = vec![false; writes.len()];
        let mut replies = replies.into_iter();
        for (&i, reply) in creations.iter().zip(replies.by_ref()) {
            // `OK` when the key was absent and is now set; nil when it exists.
            applied[i] = match reply {
                redis::Value::Okay => true,
                redis::Value::Nil => false,
                other => {
                    return Err(Error::Redis(format!(
                        "{}: SET NX answered {other:?}",
                        self.url
                    )));
                }
            };
        }
        for ((call, _), reply) in calls.iter().zip(replies) {
            let reply: Vec<i64> = redis::from_redis_value(reply)
                .map_err(|e| Error::Redis(format!("{}: compare-and-set answered {e}", self.url)))?;
            if reply.len() != call.len() {
                return Err(Error::Redis(format!(
                    "{}: compare-and-set answered {} results for {} keys",
                    self.url,
                    reply.len(),
                    call.len()
                )));
            }
            for (&i, ok) in call.iter().zip(reply) {
                applied[i] = ok == 1;
            }
        }
        Ok(applied)
    }

    async fn get_many_with_history(
        &self,
        keys: &[String],
        histories: &[String],
    ) -> Result<StatesAndHistories> {
        let mut pipe = redis::pipe();
        for k in keys.iter().chain(histories) {
            pipe.get(k);
        }
        let mut con = self.connection().await?;
        let mut raw: Vec<Option<Vec<u8>>> = pipe
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err(&self.url, e))?;
        if raw.len() != keys.len() + histories.len() {
            return Err(Error::Redis(format!(
                "{}: {} replies to a pipeline of {} commands",
                self.url,
                raw.len(),
                keys.len() + histories.len()
            )));
        }
        let read = raw
            .split_off(keys.len())
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        Ok((
            raw.into_iter().map(|v| v.and_then(split_version)).collect(),
            read,
        ))
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let mut con = self.connection().await?;
        let pattern = format!("{}*", escape_glob(prefix));
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(|e| redis_err(&self.url, e))?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    async fn add_counters(&self, hash: &str, counts: &[(String, i64)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (k, v) in counts {
            pipe.hincr(hash, k, *v).ignore();
        }
        let mut con = self.connection().await?;
        pipe.query_async::<()>(&mut con)
            .await
            .map_err(|e| redis_err(&self.url, e))
    }

    async fn counters(&self, hash: &str) -> Result<HashMap<String, i64>> {
        let mut con = self.connection().await?;
        redis::cmd("HGETALL")
            .arg(hash)
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err(&self.url, e))
    }

    async fn claim(&self, key: &str, value: &str) -> Result<String> {
        let mut con = self.connection().await?;
        let _: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err(&self.url, e))?;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err(&self.url, e))
    }

    async fn fields(&self, hash: &str) -> Result<HashMap<String, String>> {
        self.hgetall(hash).await
    }

    async fn set_fields(&self, hash: &str, fields: &[(String, String)]) -> Result<()> {
        self.hset(hash, fields).await
    }

    async fn own_connection(&self) -> Result<Self> {
        RedisStore::connect(&self.url, self.timeout).await
    }
}

impl RedisStore {
    async fn hgetall(&self, hash: &str) -> Result<HashMap<String, String>> {
        let mut con = self.connection().await?;
        redis::cmd("HGETALL")
            .arg(hash)
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err(&self.url, e))
    }

    async fn hset(&self, hash: &str, fields: &[(String, String)]) -> Result<()> {
        if fields.is_empty() {
            return Ok(());
        }
        let mut con = self.connection().await?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(hash);
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd.query_async::<()>(&mut con)
            .await
            .map_err(|e| redis_err(&self.url, e))
    }
}

fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Either store, chosen at run time (Redis when a URL is given, memory for the embedded demo).
#[derive(Clone)]
pub enum AnyStore {
    /// Redis.
    Redis(RedisStore),
    /// Process memory.
    Memory(MemoryStore),
}

impl AnyStore {
    /// Connects to Redis at `url`, or uses a fresh in-memory store when `url` is `memory://`.
    pub async fn open(url: &str, timeout: Duration) -> Result<AnyStore> {
        if url.starts_with("memory://") {
            return Ok(AnyStore::Memory(MemoryStore::new()));
        }
        Ok(AnyStore::Redis(RedisStore::connect(url, timeout).await?))
    }

    /// Like [`AnyStore::open`], but Redis is connected in the background (see
    /// [`RedisStore::connect_lazily`]).
    pub fn open_lazily(url: &str, timeout: Duration) -> Result<AnyStore> {
        if url.starts_with("memory://") {
            return Ok(AnyStore::Memory(MemoryStore::new()));
        }
        Ok(AnyStore::Redis(RedisStore::connect_lazily(url, timeout)?))
    }

    /// The same store through a connection of its own, made lazily on the calling runtime
    /// (each of the server's single-threaded workers keeps its Redis connection's task beside
    /// its requests). The in-memory store is shared as it is.
    pub fn reopen_lazily(&self) -> Result<AnyStore> {
        Ok(match self {
            AnyStore::Redis(s) => AnyStore::Redis(RedisStore::connect_lazily(&s.url, s.timeout)?),
            AnyStore::Memory(s) => AnyStore::Memory(s.clone()),
        })
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Redis($s) => $e,
            AnyStore::Memory($s) => $e,
        }
    };
}

impl StateStore for AnyStore {
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Versioned>>> {
        both!(self, s => s.get_many(keys).await)
    }
    async fn put_many(&self, writes: &[CasWrite]) -> Result<Vec<bool>> {
        both!(self, s => s.put_many(writes).await)
    }
    async fn get_many_with_history(
        &self,
        keys: &[String],
        histories: &[String],
    ) -> Result<StatesAndHistories> {
        both!(self, s => s.get_many_with_history(keys, histories).await)
    }
    async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        both!(self, s => s.keys(prefix).await)
    }
    async fn add_counters(&self, hash: &str, counts: &[(String, i64)]) -> Result<()> {
        both!(self, s => s.add_counters(hash, counts).await)
    }
    async fn counters(&self, hash: &str) -> Result<HashMap<String, i64>> {
        both!(self, s => s.counters(hash).await)
    }
    async fn claim(&self, key: &str, value: &str) -> Result<String> {
        both!(self, s => s.claim(key, value).await)
    }
    async fn fields(&self, hash: &str) -> Result<HashMap<String, String>> {
        both!(self, s => s.fields(hash).await)
    }
    async fn set_fields(&self, hash: &str, fields: &[(String, String)]) -> Result<()> {
        both!(self, s => s.set_fields(hash, fields).await)
    }
    async fn own_connection(&self) -> Result<Self> {
        Ok(match self {
            AnyStore::Redis(s) => AnyStore::Redis(s.own_connection().await?),
            AnyStore::Memory(s) => AnyStore::Memory(s.own_connection().await?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{
        CAS_HISTORY_SCRIPT, CAS_SCRIPT, CasWrite, HistoryWrite, RedisStore, Stored, cas_call,
        hash_slot,
    };

    #[test]
    fn redis_connections_turn_off_nagles_algorithm_and_bad_urls_name_the_flag() {
        let timeout = std::time::Duration::from_secs(1);
        let (client, _) = RedisStore::client("redis://127.0.0.1:6379/2", timeout).unwrap();
        // Nagle's algorithm off: a command is not held back until the previous one is acked.
        assert!(client.get_connection_info().tcp_settings().nodelay());
        let Err(e) = RedisStore::client("http://127.0.0.1:6379", timeout) else {
            panic!("an http URL is not a Redis URL");
        };
        assert!(
            e.to_string().contains("--redis `http://127.0.0.1:6379`"),
            "{e}"
        );
    }

    #[test]
    fn a_compare_and_set_call_sends_what_a_script_invocation_would() {
        let w = |key: &str, expected, value: Option<&[u8]>, ttl_ms| CasWrite {
            key: key.into(),
            expected,
            value: value.map(<[u8]>::to_vec),
            ttl_ms,
            history: None,
        };
        // An update, a deletion, a deletion of an absent key, a zero TTL, an empty state.
        let writes = [
            w("p:s:{7}a", Some(3), Some(b"state a"), 60_000),
            w("p:s:{7}b", Some(0x0102_0304_0506), None, 1),
            w("p:s:{7}c", None, None, 5),
            w("p:s:{7}d", Some(1), Some(b"state d"), 0),
            w("p:s:{7}e", Some(9), Some(b""), 7),
        ];
        let call = [4, 0, 2, 1, 3];
        // The same writes with histories (one with no records), through the other script.
        let with_history: Vec<CasWrite> = writes
            .iter()
            .enumerate()
            .map(|(i, w)| CasWrite {
                history: Some(HistoryWrite {
                    key: w.key.replacen("s:", "h:", 1),
                    records: b"records".repeat(i),
                    header: vec![0, i as u8],
                    ttl_ms: 1000 * i as u64,
                }),
                ..w.clone()
            })
            .collect();
        for (writes, source, history) in [
            (&writes[..], CAS_SCRIPT, false),
            (&with_history[..], CAS_HISTORY_SCRIPT, true),
        ] {
            let script = redis::Script::new(source);
            let mut invocation = script.prepare_invoke();
            for &i in &call {
                let w = &writes[i];
                let stored = w.value.as_ref().map_or(Vec::new(), |v| {
                    let mut s = (w.expected.unwrap_or(0) + 1).to_be_bytes().to_vec();
                    s.extend_from_slice(v);
                    s
                });
                invocation
                    .key(&w.key)
                    .arg(w.expected.map_or(Vec::new(), |v| v.to_be_bytes().to_vec()))
                    .arg(stored)
                    .arg(w.ttl_ms.max(1));
                if let Some(h) = &w.history {
                    invocation
                        .key(&h.key)
                        .arg(&h.records)
                        .arg(&h.header)
                        .arg(h.ttl_ms.max(1));
                }
            }
            let expected = redis::pipe()
                .invoke_script(&invocation)
                .get_packed_pipeline();
            let got = redis::pipe()
                .add_command(cas_call(script.get_hash(), writes, &call, history))
                .get_packed_pipeline();
            assert_eq!(got, expected, "history: {history}");
        }
    }

    #[test]
    fn a_stored_state_is_one_argument_of_its_new_version_then_its_bytes() {
        let write = |expected| CasWrite {
            key: "k".into(),
            expected,
            value: Some(b"state".to_vec()),
            ttl_ms: 1,
            history: None,
        };
        for (expected, version) in [
            (None, 1u64),
            (Some(1), 2),
            (Some(0x0102_0304_0506), 0x0102_0304_0507),
        ] {
            let w = write(expected);
            let mut cmd = redis::cmd("SET");
            cmd.arg(&w.key).arg(Stored::new(&w, b"state")).arg("PX");
            let args: Vec<Vec<u8>> = cmd
                .args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(b) => b.to_vec(),
                    other => panic!("not a plain argument: {other:?}"),
                })
                .collect();
            let mut stored = version.to_be_bytes().to_vec();
            stored.extend_from_slice(b"state");
            assert_eq!(
                args,
                vec![b"SET".to_vec(), b"k".to_vec(), stored, b"PX".to_vec()]
            );
        }
    }

    #[test]
    fn hash_slots_match_redis_cluster() {
        // CLUSTER KEYSLOT answers and the CRC16 check value of the Redis Cluster specification.
        assert_eq!(hash_slot(b"123456789"), 0x31C3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(
            hash_slot(b"{user1000}.following"),
            hash_slot(b"{user1000}.followers")
        );
        assert_eq!(hash_slot(b"foo{}{bar}"), hash_slot(b"foo{}{bar}"));
        assert_ne!(hash_slot(b"foo{}{bar}"), hash_slot(b"bar"));
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
    }
}
