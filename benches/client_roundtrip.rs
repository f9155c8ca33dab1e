//! Client round trips against the sandbox on loopback: one request at a time, so the figures
//! are latency per call (client + server + loopback). Run with
//! `cargo bench --bench client_roundtrip`.

use std::net::SocketAddr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dweetpipe::client::Client;
use dweetpipe::sandbox::simulator::S5d9Board;
use dweetpipe::sandbox::{self, SandboxConfig};

fn bench_roundtrips(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime
        .block_on(sandbox::start(SandboxConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..SandboxConfig::default()
        }))
        .expect("sandbox starts");
    let client = Client::new(&server.base_url()).expect("client");
    let payload = S5d9Board::new(1).next_payload();
    runtime.block_on(async {
        for _ in 0..500 {
            client
                .dweet_for("bench-full", &payload, None)
                .await
                .expect("dweet");
        }
    });

    let mut group = c.benchmark_group("client_roundtrip");
    group.throughput(Throughput::Elements(1));
    group.bench_function("dweet_for", |b| {
        b.to_async(&runtime).iter(|| async {
            client
                .dweet_for("bench-write", &payload, None)
                .await
                .expect("dweet")
        })
    });
    group.bench_function("dweet_quietly_for", |b| {
        b.to_async(&runtime).iter(|| async {
            client
                .dweet_quietly_for("bench-quiet", &payload, None)
                .await
                .expect("dweet")
        })
    });
    group.bench_function("get_latest_dweet_for", |b| {
        b.to_async(&runtime).iter(|| async {
            client
                .get_latest_dweet_for("bench-full", None)
                .await
                .expect("latest")
        })
    });
    group.bench_function("get_dweets_for/500", |b| {
        b.to_async(&runtime).iter(|| async {
            client
                .get_dweets_for("bench-full", None)
                .await
                .expect("history")
        })
    });
    group.finish();
    runtime.block_on(server.shutdown());
}

criterion_group!(benches, bench_roundtrips);
criterion_main!(benches);
