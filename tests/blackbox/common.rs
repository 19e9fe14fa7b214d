//! Helpers shared by the black-box tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `duet` binary under test.
pub fn duet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"));
    c.env_remove("RUST_LOG");
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

/// Asserts the exit status and returns stdout and stderr as text.
pub fn expect_status(out: &Output, code: i32) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}
