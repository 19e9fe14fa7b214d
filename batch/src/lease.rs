//! One batch job per store at a time: a lease object created atomically, renewed while the job
//! runs, and taken over only when its holder is gone (dead on this host, or expired).

use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::store::Location;
use crate::{Error, Result};

/// How long a lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(120);

/// What a lease object holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseInfo {
    /// The run holding it.
    pub run_id: String,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When the lease was taken (epoch ms).
    pub acquired_ms: i64,
    /// When it lapses unless renewed (epoch ms).
    pub expires_ms: i64,
}

/// A held lease; dropping it stops renewal, [`Lease::release`] deletes it.
pub struct Lease {
    loc: Location,
    path: Path,
    info: LeaseInfo,
    renewer: JoinHandle<()>,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Lease {
    /// Takes the lease `name` on the store, or fails naming who holds it.
    pub async fn acquire(loc: &Location, name: &str, run_id: &str) -> Result<Lease> {
        let path = loc.child(&format!("_lease/{name}.json"));
        let host = host_name();
        for _ in 0..3 {
            let now = now_ms();
            let info = LeaseInfo {
                run_id: run_id.to_string(),
                host: host.clone(),
                pid: std::process::id(),
                acquired_ms: now,
                expires_ms: now + LEASE_TTL.as_millis() as i64,
            };
            let body = serde_json::to_vec(&info).expect("serializable");
            let created = loc
                .store
                .put_opts(
                    &path,
                    body.clone().into(),
                    PutOptions::from(PutMode::Create),
                )
                .await;
            match created {
                Ok(_) => return Ok(Lease::start(loc.clone(), path, info)),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {}
                Err(object_store::Error::NotImplemented { .. }) => {
                    // The backend has no create-if-absent: check, then write.
                    if Self::holder(loc, &path).await?.is_none() {
                        loc.store
                            .put(&path, body.into())
                            .await
                            .map_err(|e| storage(loc, e))?;
                        return Ok(Lease::start(loc.clone(), path, info));
                    }
                }
                Err(e) => return Err(storage(loc, e)),
            }
            match Self::holder(loc, &path).await? {
                Some(h) if h.expires_ms > now && (h.host != host || process_alive(h.pid)) => {
                    return Err(Error::Storage(format!(
                        "another batch job holds the lease on {} (run {}, pid {} on {}, taken {}); \
                         wait for it to finish, or delete {} if that job is gone",
                        loc.url,
                        h.run_id,
                        h.pid,
                        h.host,
                        duet_spec::timestamp::format_ms(h.acquired_ms),
                        loc.display(&path)
                    )));
                }
                Some(h) => {
                    tracing::warn!(run = %h.run_id, pid = h.pid, host = %h.host, "taking over a lease whose holder is gone");
                    let _ = loc.store.delete(&path).await;
                }
                None => {}
            }
        }
        Err(Error::Storage(format!(
            "could not take the lease on {} (contended)",
            loc.url
        )))
    }

    async fn holder(loc: &Location, path: &Path) -> Result<Option<LeaseInfo>> {
        match loc.store.get(path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(|e| storage(loc, e))?;
                Ok(serde_json::from_slice(&bytes).ok())
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage(loc, e)),
        }
    }

    fn start(loc: Location, path: Path, info: LeaseInfo) -> Lease {
        let (l, p, mut i) = (loc.clone(), path.clone(), info.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_TTL / 3).await;
                i.expires_ms = now_ms() + LEASE_TTL.as_millis() as i64;
                let body = serde_json::to_vec(&i).expect("serializable");
                if let Err(e) = l.store.put(&p, body.into()).await {
                    tracing::warn!(error = %e, "could not renew the batch lease");
                }
            }
        });
        Lease {
            loc,
            path,
            info,
            renewer,
        }
    }

    /// The lease's contents.
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    /// Stops renewing and deletes the lease.
    pub async fn release(self) {
        self.renewer.abort();
        if let Err(e) = self.loc.store.delete(&self.path).await {
            tracing::warn!(error = %e, "could not delete the batch lease");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

fn storage(loc: &Location, e: object_store::Error) -> Error {
    Error::Storage(format!("cannot take the batch lease on {}: {e}", loc.url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_holder_is_refused_with_a_clear_error() {
        let loc = crate::store::resolve("memory://lease-test/store").unwrap();
        let first = Lease::acquire(&loc, "batch", "run-a").await.unwrap();
        let err = Lease::acquire(&loc, "batch", "run-b").await.err().unwrap();
        assert!(
            err.to_string()
                .contains("another batch job holds the lease"),
            "{err}"
        );
        assert!(err.to_string().contains("run-a"), "{err}");
        first.release().await;
        Lease::acquire(&loc, "batch", "run-c")
            .await
            .unwrap()
            .release()
            .await;
    }

    #[tokio::test]
    async fn a_dead_holder_on_this_host_is_taken_over() {
        let loc = crate::store::resolve("memory://lease-test2/store").unwrap();
        let stale = LeaseInfo {
            run_id: "dead".into(),
            host: host_name(),
            pid: u32::MAX - 1,
            acquired_ms: now_ms(),
            expires_ms: now_ms() + 3_600_000,
        };
        let path = loc.child("_lease/batch.json");
        loc.store
            .put(&path, serde_json::to_vec(&stale).unwrap().into())
            .await
            .unwrap();
        let lease = Lease::acquire(&loc, "batch", "alive").await.unwrap();
        assert_eq!(lease.info().run_id, "alive");
        lease.release().await;
    }
}
