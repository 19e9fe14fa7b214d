//! Black-box tests: they drive the real `duet` binary and its HTTP API, as users and scripts do.

mod batch;
mod check;
mod common;
mod deploy;
mod foundation;
mod http;
mod kafka;
mod serving;
mod speed;
