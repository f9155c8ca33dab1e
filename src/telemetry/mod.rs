//! Every metric the worker exports, named in one place (`metrics`), what `/healthz` and
//! `/readyz` answer from (`health`), and the endpoint that serves them (`endpoint`).
//!
//! Naming follows Prometheus conventions: the `dweetpipe_` prefix, base units, `_total` on
//! counters, and `thing` as the only high-cardinality label. Dashboards and alert rules are
//! written against these names, so renaming one is a breaking change.

mod endpoint;
mod health;
mod metrics;

pub use endpoint::serve;
pub use health::{Health, LoopBeat};
pub use metrics::{ConnectOutcome, Disconnect, DweetSource, Metrics, SinkName, Table};

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// The `[metrics]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// A loop (fan-out, a sink's loop) that has not turned for this long makes `/healthz`
    /// answer 503 and stops the systemd watchdog pings. Default 30s.
    #[serde(
        default = "default_stuck_after",
        deserialize_with = "crate::settings::duration"
    )]
    pub stuck_after: Duration,
}

fn default_stuck_after() -> Duration {
    Duration::from_secs(30)
}

impl MetricsConfig {
    pub fn new(listen: SocketAddr) -> Self {
        MetricsConfig {
            listen,
            stuck_after: default_stuck_after(),
        }
    }
}

/// Blocks this thread for good when `DWEETPIPE_FAULT_STALL` names `point`: an operator's fire
/// drill for the watchdog and liveness probe (README, "systemd"), and what the health tests
/// use to show that a stuck loop is reported. Costs one variable read per call.
pub fn fault_point(point: &str) {
    if std::env::var("DWEETPIPE_FAULT_STALL").is_ok_and(|stalled| stalled == point) {
        tracing::warn!(
            point,
            "fault point: this loop stalls for good (DWEETPIPE_FAULT_STALL)"
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}
