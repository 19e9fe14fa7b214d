//! A running `duet serve` and a small HTTP/1.1 client for talking to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::duet;

/// A `duet serve` process, killed on drop.
pub struct Server {
    child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    /// What the server wrote to stderr, printed when a test fails while it runs.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `duet serve` over `store` and the test Redis's state under `prefix`, with `more`
    /// flags (see [`Server::start`]).
    pub fn over(store: &str, prefix: &str, more: &[&str]) -> Server {
        let redis = crate::kafka::redis_url();
        let mut args = vec!["--store", store, "--redis", &redis, "--prefix", prefix];
        args.extend_from_slice(more);
        Server::start(&[], &args)
    }

    /// Starts `duet [global] serve [args] --listen 127.0.0.1:0` and waits until it listens.
    ///
    /// Unless `args` set `--redis-timeout-ms`, the server gets 5 s: these tests check values,
    /// not the timeout, and the first request also waits for the server's connection to Redis,
    /// which a loaded CI machine can make slower than the default 200 ms (the features would
    /// then come back `INVALID`).
    pub fn start(global: &[&str], args: &[&str]) -> Server {
        let timeout: &[&str] = if args.contains(&"--redis-timeout-ms") {
            &[]
        } else {
            &["--redis-timeout-ms", "5000"]
        };
        let mut child = duet()
            .args(global)
            .arg("serve")
            .args(args)
            .args(timeout)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("duet serve starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The address ends the text line, or the message of a JSON one.
                if let Some(addr) = line.split("listening on http://").nth(1)
                    && let Some(addr) = addr.split(['"', ' ']).next()
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_string());
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("duet serve reports its address");
        Server { child, addr, log }
    }

    /// Stops the server with SIGTERM and waits for it to flush and exit.
    pub fn stop_gracefully(mut self) {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(
            exit.success(),
            "duet serve exited with {exit} after SIGTERM"
        );
    }

    /// Sends a request; returns the status and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        request(&self.addr, method, path, body, headers)
    }

    /// POSTs JSON to `/get-online-features`.
    pub fn features(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = self.request(
            "POST",
            "/get-online-features",
            Some(body.to_string().as_bytes()),
            &[("content-type", "application/json")],
        );
        (
            status,
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}")),
        )
    }
}

impl Server {
    /// What the server wrote to stderr so far, line by line.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("--- duet serve's stderr ---\n{}", log.join("\n"));
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("server accepts connections");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}
