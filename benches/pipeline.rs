//! The worker's hot path on one core: listen-stream bytes → frame decoder → normalisation →
//! Parquet generation sealed to disk. Run with `cargo bench --bench pipeline`.
//!
//! `cargo bench --bench pipeline -- --once` runs the pipeline exactly once over the same input
//! and exits, so an instruction count of it is repeatable: `scripts/bench` runs that under
//! `valgrind --tool=callgrind` (seconds move by tens of percent on shared machines; counts do
//! not). `-- --spool-once` does the same for what a sink that falls behind adds to it: the same
//! dweets' records written to a spool segment and read back (`spool_round_trip`).

use std::sync::Arc;

use bytes::Bytes;

use criterion::{Criterion, Throughput, criterion_group};
use dweetpipe::client::{Created, Decoded, Dweet, FrameDecoder};
use dweetpipe::normalize::{Normalizer, ReadDweet, StreamReader};
use dweetpipe::protocol::encode_stream_frame;
use dweetpipe::record::Record;
use dweetpipe::sandbox::simulator::S5d9Board;
use dweetpipe::sink::parquet::{ParquetConfig, ParquetSink};
use dweetpipe::sink::spool;
use dweetpipe::telemetry::Metrics;

/// The allocator the `dweetpipe` binary ships with, so the instructions counted are the
/// worker's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DWEETS: usize = 20_000;

/// The size of each read off the connection.
const READ_BYTES: usize = 16 * 1024;

fn stream_bytes() -> Bytes {
    let mut boards: Vec<S5d9Board> = (0..20).map(S5d9Board::new).collect();
    let start = 1_795_000_000_000i64;
    (0..DWEETS)
        .flat_map(|i| {
            let dweet = Dweet {
                thing: format!("S5D9-{:04}", i % 20 + 1),
                created: Created::from_datetime(
                    chrono::DateTime::from_timestamp_millis(start + i as i64).expect("valid time"),
                ),
                content: boards[i % 20].next_payload(),
                transaction: None,
            };
            encode_stream_frame(&serde_json::to_string(&dweet).expect("encodes"))
        })
        .collect::<Vec<u8>>()
        .into()
}

#[inline(never)]
fn run_pipeline(bytes: &Bytes, dir: &std::path::Path) -> usize {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let (mut sink, _) = ParquetSink::open(
        ParquetConfig::new(dir),
        std::time::Duration::from_secs(24 * 60 * 60),
        metrics,
    )
    .expect("sink opens");
    let mut decoder = FrameDecoder::new();
    // The worker's path: a frame read with its readings in one pass by the stream's reader,
    // content kept as its JSON text. The worker has a reader per thing, found without a
    // lookup; all boards here send one shape, so one reader does the same work but for the
    // thing's name, which it checks as UTF-8 where a worker's reader finds it unchanged.
    let mut normalizer = Normalizer::default();
    let mut reader = StreamReader::default();
    let mut batch: Vec<Record> = Vec::with_capacity(8192);
    let mut dweets = 0;
    // Reads as the network hands them to the worker: slices of the connection's buffer.
    for start in (0..bytes.len()).step_by(READ_BYTES) {
        decoder.push_read(bytes.slice(start..bytes.len().min(start + READ_BYTES)));
        while let Some(event) = decoder.next_event_read_by(&mut reader) {
            if push_normalized(event, &mut normalizer, &mut batch) {
                dweets += 1;
            }
        }
        if batch.len() >= 8192 {
            sink.write(&batch).expect("write");
            batch.clear();
        }
    }
    sink.write(&batch).expect("write");
    sink.close().expect("seal");
    dweets
}

/// Appends the record of a decoded dweet, read with its readings by the stream's reader, to
/// `batch`; whether the event was a dweet.
#[inline]
fn push_normalized(
    event: Decoded<ReadDweet>,
    normalizer: &mut Normalizer,
    batch: &mut Vec<Record>,
) -> bool {
    let Decoded::Dweet(read) = event else {
        return false;
    };
    let created_ms = read.dweet.created().to_ms();
    batch.push(read.normalize(normalizer, created_ms, 0));
    true
}

/// The records the pipeline's decoder and normaliser make of `bytes`.
fn records(bytes: &Bytes) -> Vec<Record> {
    let mut decoder = FrameDecoder::new();
    let (mut normalizer, mut reader) = (Normalizer::default(), StreamReader::default());
    decoder.push_read(bytes.clone());
    let mut records = Vec::new();
    while let Some(event) = decoder.next_event_read_by(&mut reader) {
        push_normalized(event, &mut normalizer, &mut records);
    }
    records
}

/// A backlog's spool path for `records`: one segment written, then read back; how many
/// records came back.
#[inline(never)]
fn spool_round_trip(records: &[Record]) -> usize {
    let mut segment = spool::header().to_vec();
    spool::encode(records, &mut segment);
    spool::decode(&segment).map_or(0, |decoded| decoded.records.len())
}

fn bench_pipeline(c: &mut Criterion) {
    let bytes = stream_bytes();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(DWEETS as u64));
    group.sample_size(10);
    group.bench_function("decode_normalise_parquet", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("temp dir"),
            |dir| assert_eq!(run_pipeline(&bytes, dir.path()), DWEETS),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_pipeline);

/// The size of the files under `dir`, recursively.
fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => bytes_under(&entry.path()),
            _ => entry.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

fn main() {
    if std::env::args().any(|arg| arg == "--spool-once") {
        let records = records(&stream_bytes());
        assert_eq!(records.len(), DWEETS);
        assert_eq!(spool_round_trip(&records), DWEETS);
        println!("pipeline --spool-once: {DWEETS} dweets spooled and read back");
        return;
    }
    if std::env::args().any(|arg| arg == "--once") {
        let bytes = stream_bytes();
        let dir = tempfile::tempdir().expect("temp dir");
        let start = std::time::Instant::now();
        let dweets = run_pipeline(&bytes, dir.path());
        assert_eq!(dweets, DWEETS);
        let elapsed = start.elapsed();
        println!(
            "pipeline --once: {dweets} dweets in {elapsed:?}; Parquet {:.1} bytes per dweet",
            bytes_under(dir.path()) as f64 / dweets as f64
        );
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
