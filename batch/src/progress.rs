//! Progress on a terminal, structured log lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};

/// Reports the stages and counts of a long job.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Bars when `enabled` and stderr is a terminal; log lines otherwise.
    pub fn new(enabled: bool) -> Progress {
        use std::io::IsTerminal;
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        Progress { bar }
    }

    /// Starts a stage without a known length.
    pub fn stage(&self, what: &str) {
        match &self.bar {
            Some(b) => {
                b.set_style(
                    ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                        .expect("valid template"),
                );
                b.set_length(0);
                b.set_message(what.to_string());
            }
            None => tracing::info!(stage = what, "batch"),
        }
    }

    /// Starts a stage of `len` steps.
    pub fn bar(&self, len: u64, what: &str) {
        match &self.bar {
            Some(b) => {
                b.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} [{elapsed}<{eta}]")
                        .expect("valid template"),
                );
                b.set_length(len);
                b.set_position(0);
                b.set_message(what.to_string());
            }
            None => tracing::info!(stage = what, steps = len, "batch"),
        }
    }

    /// One step done.
    pub fn inc(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
