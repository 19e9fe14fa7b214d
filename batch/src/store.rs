//! Storage by URL: local paths, `file://`, `s3://bucket/prefix` and `memory://name/prefix`,
//! each resolved to an `object_store` backend and a prefix inside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;

use crate::{Error, Result};

/// A resolved location: a backend and a prefix inside it.
#[derive(Clone, Debug)]
pub struct Location {
    /// The URL as the user wrote it, for messages.
    pub url: String,
    /// The backend.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside the backend (may be empty).
    pub prefix: Path,
    /// The URL of the backend's root, as DataFusion registers object stores (`s3://bucket`).
    pub root_url: url::Url,
}

impl Location {
    /// The path of `child` under this location's prefix.
    pub fn child(&self, child: &str) -> Path {
        if self.prefix.as_ref().is_empty() {
            Path::from(child)
        } else {
            Path::from(format!("{}/{child}", self.prefix.as_ref()))
        }
    }

    /// A location under this one.
    pub fn join(&self, child: &str) -> Location {
        Location {
            url: format!("{}/{child}", self.url.trim_end_matches('/')),
            store: self.store.clone(),
            prefix: self.child(child),
            root_url: self.root_url.clone(),
        }
    }

    /// A readable name for `path` inside this location's backend.
    pub fn display(&self, path: &Path) -> String {
        let rel = path
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(path.as_ref())
            .trim_start_matches('/');
        if rel.is_empty() {
            self.url.clone()
        } else {
            format!("{}/{rel}", self.url.trim_end_matches('/'))
        }
    }
}

fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// Resolves a location URL. A local path need not exist yet (it is created for writing).
pub fn resolve(url_text: &str) -> Result<Location> {
    let bad = |why: String| Error::BadInput(format!("location `{url_text}`: {why}"));
    if let Some(rest) = url_text.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket: write s3://bucket/prefix".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if std::env::var("AWS_DEFAULT_REGION").is_err() && std::env::var("AWS_REGION").is_err() {
            builder = builder.with_region("us-east-1");
        }
        if let Ok(region) = std::env::var("AWS_REGION") {
            builder = builder.with_region(region);
        }
        let store = builder
            .build()
            .map_err(|e| bad(format!("cannot configure S3 (set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): {e}")))?;
        return Ok(Location {
            url: url_text.to_string(),
            store: Arc::new(store),
            prefix: Path::from(prefix.trim_end_matches('/')),
            root_url: url::Url::parse(&format!("s3://{bucket}")).map_err(|e| bad(e.to_string()))?,
        });
    }
    if let Some(rest) = url_text.strip_prefix("memory://") {
        let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let store = memory_stores()
            .lock()
            .expect("not poisoned")
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(InMemory::new()))
            .clone();
        let host = if name.is_empty() { "default" } else { name };
        return Ok(Location {
            url: url_text.to_string(),
            store,
            prefix: Path::from(prefix.trim_end_matches('/')),
            root_url: url::Url::parse(&format!("memory://{host}"))
                .map_err(|e| bad(e.to_string()))?,
        });
    }
    if url_text.contains("://") && !url_text.starts_with("file://") {
        return Err(bad(
            "unsupported scheme: use a local path, file://, s3:// or memory://".into(),
        ));
    }
    let local = url_text.strip_prefix("file://").unwrap_or(url_text);
    if local.is_empty() {
        return Err(bad("empty path".into()));
    }
    let abs = normalize(&std::path::absolute(local).map_err(|e| bad(e.to_string()))?);
    let store = LocalFileSystem::new();
    let prefix = Path::from_absolute_path(&abs).map_err(|e| bad(e.to_string()))?;
    Ok(Location {
        url: url_text.to_string(),
        store: Arc::new(store),
        prefix,
        root_url: url::Url::parse("file:///").expect("a valid URL"),
    })
}

/// Resolves `.` and `..` lexically (the path need not exist yet).
fn normalize(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_each_scheme() {
        let m = resolve("memory://t1/a/b").unwrap();
        assert_eq!(m.prefix.as_ref(), "a/b");
        assert_eq!(m.child("x.json").as_ref(), "a/b/x.json");
        let l = resolve("/tmp/duet-store").unwrap();
        assert_eq!(l.prefix.as_ref(), "tmp/duet-store");
        let up = resolve("/tmp/a/../b/./c").unwrap();
        assert_eq!(up.prefix.as_ref(), "tmp/b/c");
        let f = resolve("file:///tmp/x").unwrap();
        assert_eq!(f.prefix.as_ref(), "tmp/x");
        assert!(matches!(resolve("ftp://x"), Err(Error::BadInput(_))));
        assert!(matches!(resolve("s3:///x"), Err(Error::BadInput(_))));
    }
}
