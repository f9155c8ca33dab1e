//! The HTTP endpoint: `/metrics` in Prometheus' text format, `/healthz` and `/readyz` as
//! 200 or 503 with the reason.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Health, Metrics};
use crate::http_server::{self, Body};

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let handler = Arc::new(move |request: Request<hyper::body::Incoming>| {
        let answer = answer(request.uri().path(), &metrics, &health);
        async move { answer }
    });
    http_server::serve(listener, handler, shutdown).await;
}

fn answer(path: &str, metrics: &Metrics, health: &Health) -> Response<Body> {
    let (status, content_type, text) = match path {
        "/metrics" => {
            metrics.uptime.set(health.started.elapsed().as_secs_f64());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.encode(),
            )
        }
        "/healthz" => match health.liveness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not alive: {why}\n"),
            ),
        },
        "/readyz" => match health.readiness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
