//! Helpers shared by the black-box tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `duet` binary under test, without the settings of the shell that runs the tests
/// (`DUET_*` variables) or its log filter.
pub fn duet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"));
    c.env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DUET_") {
            c.env_remove(name);
        }
    }
    c
}

/// Runs `duet` with `args`, returning its output.
pub fn run(args: &[&str]) -> Output {
    duet().args(args).output().expect("the duet binary runs")
}

/// A file of the golden data set.
pub fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Text of a path, for command lines.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Asserts the exit status and returns stdout and stderr as text. A failure's cause
/// (`duet: ...`, then one line per problem of a spec) ends stderr: no log line follows it.
pub fn expect_status(out: &Output, code: i32) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    if code != 0 && !stderr.contains("Usage:") {
        // A log line starts with its time stamp, or is a JSON object.
        let is_log = |l: &str| {
            l.starts_with('{')
                || (l
                    .get(..4)
                    .is_some_and(|y| y.bytes().all(|b| b.is_ascii_digit()))
                    && l.get(4..5) == Some("-"))
        };
        let lines: Vec<&str> = stderr.trim_end().lines().collect();
        let cause = lines.iter().rposition(|l| l.starts_with("duet: "));
        assert!(
            cause.is_some_and(|i| !lines[i..].iter().any(|l| is_log(l))),
            "the cause does not end stderr:\n{stderr}"
        );
    }
    (stdout, stderr)
}

/// Runs `duet` with `args` and then `--listen` at a taken address and at a malformed one: the
/// first must exit 1 and the second 2, each with a one-line cause naming the address, last on
/// stderr. Returns each run's listen address and stderr.
pub fn expect_listen_refused(args: &[&str]) -> Vec<(String, String)> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut out = Vec::new();
    for (listen, status) in [(addr.as_str(), 1), ("127.0.0.1:port", 2)] {
        let run_out = run(&[args, &["--listen", listen]].concat());
        let (_, stderr) = expect_status(&run_out, status);
        let cause = stderr.trim_end().lines().last().unwrap_or_default();
        assert!(
            cause.starts_with("duet: --listen ") && cause.contains(listen),
            "{listen}: {stderr}"
        );
        out.push((listen.to_string(), stderr));
    }
    drop(taken);
    out
}
