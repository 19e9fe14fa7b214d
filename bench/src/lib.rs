//! Shared helpers of the benchmark programs: timing, percentiles, process memory.

use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `p`-quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Peak resident memory of a finished child, from `/usr/bin/time -v` output, in MiB.
pub fn peak_rss_mib(time_v_stderr: &str) -> Option<f64> {
    time_v_stderr
        .lines()
        .find(|l| l.contains("Maximum resident set size"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
}

/// The golden JSON lines, decompressed.
pub fn golden_lines() -> Vec<u8> {
    use std::io::Read;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/events.jsonl.gz");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(file)
        .read_to_end(&mut out)
        .expect("gzip");
    out
}

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// Kafka helpers shared by the speed and check benchmarks.
pub mod kafka {
    use std::time::Duration;

    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("admin client")
    }

    /// Creates `topic` with `partitions` partitions.
    pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
        for r in admin(brokers)
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .expect("create topics")
        {
            r.unwrap_or_else(|e| panic!("create topic {topic}: {e:?}"));
        }
    }

    /// Deletes `topics`, so that repeated runs do not pile messages up in the broker (tansu's
    /// in-memory storage keeps every message of a topic until it is deleted: after ten 5M-event
    /// runs it held 12 GB, and the machine's page faults slowed everything measured next). A
    /// failure is reported, not fatal: what was measured does not depend on it.
    pub async fn delete_topics(brokers: &str, topics: &[&str]) {
        match admin(brokers)
            .delete_topics(topics, &AdminOptions::new())
            .await
        {
            Ok(results) => {
                for r in results {
                    if let Err((topic, e)) = r {
                        eprintln!("could not delete topic {topic}: {e}");
                    }
                }
            }
            Err(e) => eprintln!("could not delete topics {topics:?}: {e}"),
        }
    }

    /// A producer tuned for preloading a topic.
    pub fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "2000000")
            .set("compression.type", "none")
            .create()
            .expect("producer")
    }

    /// Sends one record, waiting while the producer's queue is full.
    pub fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, line: &[u8]) {
        let mut record = BaseRecord::to(topic).key(key).payload(line);
        loop {
            match p.send(record) {
                Ok(()) => return,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Sends every JSON line keyed by its user, then waits for the broker to have them all.
    pub fn preload(brokers: &str, topic: &str, lines: &[&[u8]]) {
        let p = producer(brokers);
        for line in lines {
            let key = duet_spec::event::parse_json_event(line)
                .map(|e| e.user_id.into_owned())
                .unwrap_or_default();
            send(&p, topic, &key, line);
        }
        p.flush(Duration::from_secs(300)).expect("flush");
    }
}

/// The text of an admin endpoint's `/metrics` (empty when it does not answer).
pub async fn metrics(admin: &str) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else {
        return String::new();
    };
    let _ = s
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf).await;
    buf
}

/// The sum of every sample of metric `name` (all label sets) in a scrape.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `duet` with `args`, panicking with its stderr on failure.
pub fn duet(bin: &str, args: &[&str]) {
    let out = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "duet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects to `addr`.
    pub async fn open(addr: &str) -> Conn {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            s,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Sends one request and reads the whole response; returns the status code.
    pub async fn post(&mut self, req: &[u8]) -> u16 {
        self.s.write_all(req).await.unwrap();
        self.buf.clear();
        let mut searched: usize = 0;
        let (head_end, len) = loop {
            self.fill().await;
            let from = searched.saturating_sub(3);
            if let Some(i) = self.buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                let head_end = from + i + 4;
                let len = self.buf[..head_end]
                    .split(|b| *b == b'\n')
                    .find_map(|line| {
                        let (name, value) = line.split_at(line.iter().position(|b| *b == b':')?);
                        name.eq_ignore_ascii_case(b"content-length").then(|| {
                            std::str::from_utf8(&value[1..])
                                .unwrap()
                                .trim()
                                .parse::<usize>()
                                .unwrap()
                        })
                    })
                    .unwrap_or(0);
                break (head_end, len);
            }
            searched = self.buf.len();
        };
        while self.buf.len() < head_end + len {
            self.fill().await;
        }
        std::str::from_utf8(&self.buf[9..12])
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Sends one Redis command (RESP) and reads its reply, which must be a bulk string or nil.
    pub async fn redis(&mut self, cmd: &[u8]) {
        self.s.write_all(cmd).await.unwrap();
        self.buf.clear();
        loop {
            self.fill().await;
            let Some(line) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                continue;
            };
            assert_eq!(self.buf[0], b'$', "not a bulk reply: {:?}", self.buf);
            let len: i64 = std::str::from_utf8(&self.buf[1..line])
                .unwrap()
                .parse()
                .unwrap();
            let end = line + 2 + usize::try_from(len).map_or(0, |n| n + 2);
            while self.buf.len() < end {
                self.fill().await;
            }
            return;
        }
    }

    /// Sends one Redis command (RESP) whose reply must be a simple string (`+OK`), such as
    /// `AUTH` or `SELECT`; an error reply (a wrong password, say) stops with its text.
    pub async fn redis_ok(&mut self, cmd: &[u8]) {
        self.s.write_all(cmd).await.unwrap();
        self.buf.clear();
        let line = loop {
            self.fill().await;
            if let Some(line) = self.buf.windows(2).position(|w| w == b"\r\n") {
                break line;
            }
        };
        assert_eq!(
            self.buf[0],
            b'+',
            "Redis refused {:?}: {}",
            String::from_utf8_lossy(cmd.split(|b| *b == b'\n').nth(2).unwrap_or_default()).trim(),
            String::from_utf8_lossy(&self.buf[..line])
        );
    }

    /// Reads what has arrived onto the end of the buffer.
    async fn fill(&mut self) {
        if self.buf.capacity() - self.buf.len() < 16384 {
            self.buf.reserve(65536);
        }
        let n = self.s.read_buf(&mut self.buf).await.unwrap();
        assert!(n > 0, "server closed the connection");
    }
}

/// A `/get-online-features` request for every catalog feature of `users`.
pub fn request(addr: &str, users: &[String]) -> Vec<u8> {
    let features = [
        "user_realtime:txn_count_1h",
        "user_realtime:txn_sum_1h",
        "user_realtime:event_count_10m",
        "user_realtime:session_event_count",
        "user_realtime:session_duration_s",
        "user_realtime:last_purchase_amount",
        "user_batch:txn_count_90d",
        "user_batch:avg_txn_amount_30d_v1",
        "user_batch:avg_txn_amount_30d_v2",
        "user_batch:max_txn_amount_90d",
        "user_batch:refund_rate_90d",
        "user_batch:active_days_30d",
        "user_batch:account_age_days",
        "user_batch:spend_pct_rank_30d",
    ];
    let body =
        serde_json::json!({"features": features, "entities": {"user_id": users}}).to_string();
    format!("POST /get-online-features HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// Deletes every Redis key under `prefix` (the state a benchmark wrote).
pub fn delete_prefix(con: &mut redis::Connection, prefix: &str) {
    let _ = redis::cmd("EVAL")
        .arg("for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 0")
        .arg(0)
        .arg(format!("{prefix}*"))
        .query::<()>(con);
}

/// `duet speed run` over `topic` into Redis under `prefix`, consumer group `group`, sending no
/// dead letters; `admin` serves its metrics; `idle` seconds of idleness stop it.
pub fn speed_command(
    bin: &str,
    [brokers, topic, group, redis, prefix]: [&str; 5],
    admin: Option<&str>,
    idle: Option<&str>,
) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "speed",
        "run",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--group",
        group,
        "--redis",
        redis,
        "--prefix",
        prefix,
        "--dead-letter-topic",
        "none",
    ]);
    if let Some(a) = admin {
        c.args(["--admin", a]);
    }
    if let Some(i) = idle {
        c.args(["--exit-when-idle", i]);
    }
    c.env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    c
}

/// Runs `duet speed run` over `topic` into Redis under `prefix` until it has been idle for 2 s.
pub fn speed_until_idle(bin: &str, brokers: &str, topic: &str, redis: &str, prefix: &str) {
    let status = speed_command(bin, [brokers, topic, topic, redis, prefix], None, Some("2"))
        .status()
        .expect("duet runs");
    assert!(status.success(), "duet speed run: {status}");
}

/// Starts `duet serve` on `addr` over `store` and the state under `prefix`, logging a fraction
/// `log_sample` of the served vectors, and waits until it accepts connections.
pub fn start_serve(bin: &str, args: [&str; 4], log_sample: &str) -> std::process::Child {
    start_serve_with(bin, args, log_sample, &[])
}

/// [`start_serve`] with more environment variables for the server.
pub fn start_serve_with(
    bin: &str,
    [store, redis, prefix, addr]: [&str; 4],
    log_sample: &str,
    env: &[(&str, &str)],
) -> std::process::Child {
    let child = Command::new(bin)
        .args([
            "serve",
            "--store",
            store,
            "--redis",
            redis,
            "--prefix",
            prefix,
            "--listen",
            addr,
            "--log-sample",
            log_sample,
        ])
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("duet serve runs");
    for _ in 0..400 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}
