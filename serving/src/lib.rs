//! # duet-serving: the feature server
//!
//! `duet serve`: merges each batch view's newest snapshot (held in memory, swapped atomically
//! when a newer one is published) with the speed layer's state (one pipelined Redis round trip
//! per request), evaluated as of now or as of the request's `as_of`. Speaks the Feast
//! feature-server wire format.

pub mod api;
pub mod served_log;
pub mod server;
pub mod snapshots;

/// What can go wrong in the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or setting is wrong.
    #[error("{0}")]
    BadInput(String),
    /// Reading snapshots failed.
    #[error("{0}")]
    Batch(duet_batch::Error),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// True when the user's input is at fault (exit status 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::BadInput(_) => true,
            Error::Batch(b) => b.is_bad_input(),
            Error::Internal(_) => false,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
