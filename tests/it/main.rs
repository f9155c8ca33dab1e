//! Integration tests: the real sandbox over TCP on 127.0.0.1, driven by the client library, by
//! raw HTTP bytes and by the `dweetpipe` binary. Each test starts its own sandbox on a free
//! port, so they run in parallel without sharing state.

mod alerts;
mod browser;
mod chaos;
mod cli;
mod client;
mod cluster;
mod common;
mod deploy;
mod faults;
mod grafana;
mod history;
mod hostile;
mod lifecycle;
mod listen;
mod newcomer;
mod postgres;
mod prometheus;
mod protocol;
mod query;
mod readers;
mod sandbox_store;
mod security;
mod worker;
