//! The speed layer's admin endpoint: `/metrics` (Prometheus text) and `/healthz`.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::SpeedMetrics;
use crate::{Error, Result};

/// Serves the admin endpoint on `addr` until `shutdown`.
pub async fn start(
    addr: &str,
    metrics: Arc<SpeedMetrics>,
    shutdown: CancellationToken,
) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::BadInput(format!("--admin {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    tracing::info!(%bound, "admin endpoint (/metrics, /healthz)");
    Ok(bound)
}
