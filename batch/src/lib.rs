//! # duet-batch: the batch layer
//!
//! Reads the offline event log (Parquet and JSON lines on any `object_store`), computes batch
//! views into versioned Parquet snapshots, and builds point-in-time training sets.

pub mod asof;
pub mod entities;
pub mod lease;
pub mod log;
pub mod pages;
pub mod par;
pub mod pit;
pub mod progress;
pub mod publish;
pub mod run;
pub mod snapshot;
pub mod store;
pub mod tiles;
pub mod training;
pub mod translate;

/// What can go wrong in the batch layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input (a flag, a file, a location) is wrong; the message names it.
    #[error("{0}")]
    BadInput(String),
    /// Storage could not be reached or written.
    #[error("{0}")]
    Storage(String),
    /// A query or computation failed.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// True when the user's input is at fault (exit status 2) rather than the system (1).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::BadInput(_))
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
