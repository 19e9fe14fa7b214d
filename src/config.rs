//! Settings shared by every command: flags win over `DUET_*` environment variables, which win
//! over the config file (`--config duet.toml`), which wins over built-in defaults.

use std::path::Path;

use serde::Deserialize;

/// The config file. Every key is optional; see `duet.example.toml` for each one's meaning.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The feature spec.
    pub spec: Option<String>,
    /// The offline event log.
    pub events: Option<String>,
    /// The snapshot and report store.
    pub store: Option<String>,
    /// The Redis URL of the speed layer's state.
    pub redis: Option<String>,
    /// Kafka bootstrap servers.
    pub brokers: Option<String>,
    /// The event topic.
    pub topic: Option<String>,
    /// The speed layer's consumer group.
    pub group: Option<String>,
    /// The server's listen address.
    pub listen: Option<String>,
    /// Key prefix of the speed layer's state in Redis.
    pub prefix: Option<String>,
    /// The speed layer's admin address (metrics, health).
    pub admin: Option<String>,
    /// Bearer token the server requires, if any.
    pub auth_token: Option<String>,
    /// The speed layer's dead-letter topic.
    pub dead_letter_topic: Option<String>,
    /// Where the speed layer archives consumed events.
    pub archive: Option<String>,
}

impl Config {
    /// Reads the config file at `path`; no path means an empty config.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::BadInput(format!("--config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            let (line, col) = e
                .span()
                .map(|s| duet_spec::diagnostic::line_col(&text, s.start))
                .unwrap_or((1, 1));
            crate::BadInput(format!(
                "{}:{line}:{col}: {}",
                path.display(),
                e.message().trim()
            ))
            .into()
        })
    }
}

/// The first of `flag` (already merged with its environment variable by clap) and the config
/// file's value; an error naming the flag when both are missing.
pub fn required(
    flag: &Option<String>,
    file: &Option<String>,
    name: &str,
) -> anyhow::Result<String> {
    flag.clone().or_else(|| file.clone()).ok_or_else(|| {
        crate::BadInput(format!(
            "--{name} is required (or set DUET_{} or `{name}` in the config file)",
            name.to_uppercase().replace('-', "_")
        ))
        .into()
    })
}
