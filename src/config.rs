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
    /// Most entities in one request to the server.
    pub max_entities: Option<usize>,
    /// Largest request body the server accepts, in bytes.
    pub max_body_bytes: Option<usize>,
    /// The server's longest wait for Redis per request, in milliseconds.
    pub redis_timeout_ms: Option<u64>,
    /// How often the server looks for a newer snapshot, in milliseconds.
    pub snapshot_poll_ms: Option<u64>,
    /// The server's longest wait for a past snapshot (`as_of`), in milliseconds.
    pub snapshot_load_timeout_ms: Option<u64>,
    /// The server's threads.
    pub serve_workers: Option<u32>,
    /// Fraction of entities in the served-feature log.
    pub log_sample: Option<f64>,
    /// Log as JSON lines instead of text.
    pub log_json: Option<bool>,
    /// The speed layer's largest batch per flush.
    pub max_batch: Option<usize>,
    /// The speed layer's longest wait before flushing a partial batch, in milliseconds.
    pub flush_ms: Option<u64>,
    /// The speed layer stops once caught up for this many seconds.
    pub exit_when_idle: Option<f64>,
    /// Snapshots kept per view by the batch job.
    pub retain: Option<usize>,
    /// The batch job never draws progress bars.
    pub no_progress: Option<bool>,
    /// The consistency check's tolerated mismatch rate per feature.
    pub max_mismatch_rate: Option<f64>,
    /// The file these settings came from, for messages.
    #[serde(skip)]
    pub path: Option<std::path::PathBuf>,
}

impl Config {
    /// Reads the config file at `path`; no path means an empty config.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::BadInput(format!("--config {}: {e}", path.display())))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            let (line, col) = e
                .span()
                .map(|s| duet_spec::diagnostic::line_col(&text, s.start))
                .unwrap_or((1, 1));
            crate::BadInput(format!(
                "{}:{line}:{col}: {}",
                path.display(),
                e.message().trim()
            ))
        })?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }
}

/// The first of `flag` (already merged with its environment variable by clap), the config
/// file's value of `key` (checked by `check`, as the flag's parser checks the flag) and
/// `default`. A bad value in the file is an error naming the file and the key.
pub fn setting<T: Copy + std::fmt::Display>(
    flag: Option<T>,
    file: Option<T>,
    config: &Config,
    key: &str,
    check: impl Fn(&str) -> Result<T, String>,
    default: T,
) -> anyhow::Result<T> {
    Ok(optional_setting(flag, file, config, key, check)?.unwrap_or(default))
}

/// [`setting`] for a setting without a default: `None` when neither the flag nor the file
/// gives it.
pub fn optional_setting<T: Copy + std::fmt::Display>(
    flag: Option<T>,
    file: Option<T>,
    config: &Config,
    key: &str,
    check: impl Fn(&str) -> Result<T, String>,
) -> anyhow::Result<Option<T>> {
    if let Some(v) = flag {
        return Ok(Some(v));
    }
    let Some(v) = file else {
        return Ok(None);
    };
    check(&v.to_string()).map(Some).map_err(|why| {
        let file = config
            .path
            .as_ref()
            .map_or_else(|| "the config file".into(), |p| p.display().to_string());
        crate::BadInput(format!("{file}: `{key}` = {v}: {why}")).into()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_the_example_config_is_known() {
        let example = include_str!("../duet.example.toml");
        // Every commented-out setting, uncommented.
        let keys: Vec<&str> = example
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| {
                l.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
            })
            .collect();
        assert!(keys.len() >= 20, "{keys:?}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("duet.toml");
        std::fs::write(&path, keys.join("\n")).unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.max_entities, Some(1000));
        assert_eq!(config.log_sample, Some(0.01));
        assert_eq!(config.serve_workers, Some(2));
        assert_eq!(config.max_batch, Some(500_000));
        assert_eq!(config.exit_when_idle, Some(30.0));
        assert_eq!(config.no_progress, Some(true));
        assert_eq!(config.max_mismatch_rate, Some(0.001));
        assert_eq!(config.path.as_deref(), Some(path.as_path()));
    }
}
