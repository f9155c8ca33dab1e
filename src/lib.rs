//! dweetpipe: keep, query and watch the data of a dweet.io fleet.
//!
//! - [`client`]: an async client for the dweet.io API (everything dweepy does).
//! - [`sandbox`]: a dweet.io-compatible server and an S5D9 fleet simulator, for tests, demos
//!   and self-hosting now that the public service is gone.
//! - [`protocol`]: the wire facts both of them share.
//!
//! See `ARCHITECTURE.md` for the map of modules and the data flow.

pub mod backoff;
pub mod client;
pub mod config;
pub mod http_server;
pub mod import;
pub mod normalize;
pub mod protocol;
pub mod sandbox;
pub mod sink;
pub mod systemd;
pub mod telemetry;
pub mod worker;
