//! Frame decoder throughput: S5D9 dweets as the listen stream frames them, fed in network-sized
//! reads, and as NDJSON lines. Run with `cargo bench --bench decoder`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dweetpipe::client::{Created, Decoded, Dweet, FrameDecoder};
use dweetpipe::protocol::encode_stream_frame;
use dweetpipe::sandbox::simulator::S5d9Board;
use std::hint::black_box;

const DWEETS: usize = 10_000;

fn s5d9_dweets() -> Vec<String> {
    let mut board = S5d9Board::new(42);
    (0..DWEETS)
        .map(|i| {
            let dweet = Dweet {
                thing: "S5D9-0001".to_owned(),
                created: Created::new(format!(
                    "2026-11-23T10:{:02}:{:02}.{:03}Z",
                    i / 60_000 % 60,
                    i / 1000 % 60,
                    i % 1000
                )),
                content: board.next_payload(),
                transaction: None,
            };
            serde_json::to_string(&dweet).expect("dweet encodes")
        })
        .collect()
}

fn decode_all(bytes: &[u8], read_size: usize) -> usize {
    let mut decoder = FrameDecoder::new();
    let mut dweets = 0;
    for read in bytes.chunks(read_size) {
        decoder.push(read);
        while let Some(event) = decoder.next_event() {
            if matches!(event, Decoded::Dweet(_)) {
                dweets += 1;
            }
        }
    }
    dweets
}

fn bench_decoder(c: &mut Criterion) {
    let dweets = s5d9_dweets();
    let framed: Vec<u8> = dweets.iter().flat_map(|d| encode_stream_frame(d)).collect();
    let ndjson: Vec<u8> = dweets
        .iter()
        .flat_map(|d| format!("{d}\n").into_bytes())
        .collect();
    assert_eq!(decode_all(&framed, 1500), DWEETS);
    assert_eq!(decode_all(&ndjson, 1500), DWEETS);

    let mut group = c.benchmark_group("frame_decoder");
    group.throughput(Throughput::Elements(DWEETS as u64));
    for read_size in [64usize, 1500, 16 * 1024] {
        group.bench_with_input(
            BenchmarkId::new("double_encoded", read_size),
            &read_size,
            |b, &size| b.iter(|| decode_all(black_box(&framed), size)),
        );
    }
    group.bench_function("ndjson/1500", |b| {
        b.iter(|| decode_all(black_box(&ndjson), 1500))
    });
    group.finish();
}

criterion_group!(benches, bench_decoder);
criterion_main!(benches);
