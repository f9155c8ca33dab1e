//! dweetpipe: keep, query and watch the data of a dweet.io fleet.
//!
//! # Layout
//!
//! Data flows one way: source → decode → normalise → fan-out → sinks. Each module may use only
//! modules of lower layers (`tests/layering.rs` enforces it); `config` only assembles the
//! sections the components define, and only `worker` (and the binary's `cli/`) uses it.
//!
//! | layer | modules |
//! |---|---|
//! | 0: shared facts | [`protocol`] (wire facts of both ends), [`backoff`] (retry delays), [`settings`] (config units and the validation error), [`record`] (what flows to the sinks), `http_server` (the HTTP/1 accept loop) |
//! | 1: clients and telemetry | [`client`] (the dweet.io API; listen streams yield events), [`nats`] (the NATS connection), [`telemetry`] (metric names, health, the endpoint) |
//! | 2: pure cores | [`normalize`] (dweet → record), [`alert`] (the condition engine and `[thing.alert]`) |
//! | 3: components | [`source`] (`[source]`, things, one subscription per thing), [`sink`] (the fan-out, backlogs and spool, Parquet, PostgreSQL, the JetStream output), [`cluster`] (membership, ownership and leader through NATS JetStream), [`sandbox`] (the dweet.io-compatible server and simulator) |
//! | 4: features | [`lifecycle`] (locks and alerts from the file), [`import`] (JSON Lines into the sinks) |
//! | 5: configuration | [`config`] (things.toml: read, override, validate, assemble) |
//! | 6: wiring | [`worker`] (start, reload, shut down) |
//!
//! Features (all on by default): `worker` (sinks, sources, config, lifecycle, import,
//! telemetry), `sandbox` (the server and simulator), `alert` (the QuickJS engine), `cli` (the
//! binary). With `default-features = false` the crate is the client alone: [`client`],
//! [`protocol`], [`normalize`], [`record`], [`settings`], [`backoff`].
//!
//! See `ARCHITECTURE.md` for the data path and its invariants.

#[cfg(feature = "alert")]
pub mod alert;
pub mod backoff;
pub mod client;
#[cfg(feature = "worker")]
pub mod cluster;
#[cfg(feature = "worker")]
pub mod config;
#[cfg(feature = "server")]
pub(crate) mod http_server;
#[cfg(feature = "worker")]
pub mod import;
#[cfg(feature = "worker")]
pub mod lifecycle;
#[cfg(feature = "worker")]
pub mod nats;
pub mod normalize;
pub mod protocol;
#[cfg(feature = "worker")]
pub mod query;
pub mod record;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod settings;
#[cfg(feature = "worker")]
pub mod sink;
#[cfg(feature = "worker")]
pub mod source;
#[cfg(feature = "worker")]
pub mod telemetry;
#[cfg(feature = "worker")]
pub mod worker;
