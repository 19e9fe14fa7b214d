//! # duet-speed: the speed layer
//!
//! A Kafka consumer-group member that keeps every streaming feature of the spec in Redis,
//! exactly once across crashes, restarts and rebalances, and tolerant of late, duplicate and
//! invalid events. The [`state`] module defines an entity's state and its exact evaluation as
//! of any instant; [`processor`] applies batches of messages; [`consumer`] drives it from Kafka.

pub mod admin;
pub mod archive;
pub mod codec;
pub mod consumer;
pub mod dump;
mod flush;
pub mod history;
pub mod metrics;
pub mod plan;
pub mod processor;
pub mod state;
pub mod store;
pub mod writes;

/// What can go wrong in the speed layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or setting is wrong; the message names it.
    #[error("{0}")]
    BadInput(String),
    /// Redis failed or timed out.
    #[error("redis {0}")]
    Redis(String),
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// True when the user's input is at fault (exit status 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::BadInput(_))
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
