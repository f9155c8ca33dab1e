//! Property tests: the fuzzing that runs in CI. Arbitrary bytes, splits and documents against
//! the units that take input from the network or a file; none may panic, and what is valid
//! must survive any way it is cut. `PROPTEST_CASES=100000 cargo test --test properties` runs
//! a longer campaign.

use dweetpipe::client::{Created, Decoded, Dweet, FrameDecoder};
use dweetpipe::normalize::normalize;
use dweetpipe::protocol::encode_stream_frame;
use dweetpipe::record::Record;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn drain(decoder: &mut FrameDecoder) -> Vec<Decoded> {
    std::iter::from_fn(|| decoder.next_event()).collect()
}

/// Arbitrary JSON, nested a few levels, with strings that include quotes, escapes and NULs.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    // Failures are kept as explicit regression tests below, not in a seed file.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_decoder_never_panics_on_arbitrary_bytes(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20), max_line in 1usize..512) {
        let mut decoder = FrameDecoder::with_max_line(max_line);
        for chunk in &chunks {
            decoder.push(chunk);
            let _ = drain(&mut decoder);
        }
        let _ = decoder.finish();
    }

    #[test]
    fn valid_frames_decode_however_they_are_split(content in json_value(), thing in "[a-zA-Z0-9 _/-]{1,20}", cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let dweet = Dweet { thing, created: Created::new("2026-01-01T00:00:00.000Z"), content: json!({"v": content}), transaction: None };
        let text = serde_json::to_string(&dweet).unwrap();
        let mut bytes = encode_stream_frame(&text);
        bytes.extend(encode_stream_frame(&text));
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut decoder = FrameDecoder::new();
        let mut events = Vec::new();
        let mut from = 0;
        for point in points.into_iter().chain([bytes.len()]) {
            decoder.push(&bytes[from..point]);
            events.extend(drain(&mut decoder));
            from = point;
        }
        prop_assert_eq!(events.len(), 2);
        for event in events {
            prop_assert_eq!(event, Decoded::Dweet(dweet.clone()));
        }
    }

    #[test]
    fn normalisation_never_panics_and_accounts_for_every_number(content in json_value()) {
        let dweet = Dweet { thing: "t".into(), created: Created::new("2026-01-01T00:00:00.000Z"), content: content.clone(), transaction: None };
        match normalize(&dweet, 0) {
            Record::Dweet(normalized) => {
                prop_assert!(content.is_object());
                let numbers = count_numbers(&content);
                let mut all = Vec::new();
                leaves(&content, &mut String::new(), &mut all);
                prop_assert_eq!(all.len(), numbers);
                // Paths that come out alike (an empty key beside an array index) are one
                // reading, at the first place, with the last value: a sink's key is the path.
                let mut expected: Vec<(String, u64)> = Vec::new();
                for (path, bits) in all {
                    match expected.iter_mut().find(|(seen, _)| *seen == path) {
                        Some(reading) => reading.1 = bits,
                        None => expected.push((path, bits)),
                    }
                }
                let got: Vec<(String, u64)> = normalized.readings.iter().map(|r| (r.sensor.to_string(), r.value.to_bits())).collect();
                prop_assert_eq!(got, expected, "each leaf by its path, with serde_json's value to the bit");
                let back: Value = serde_json::from_str(&normalized.content).unwrap();
                prop_assert_eq!(back, content, "the raw record is lossless");
            }
            Record::DeadLetter(letter) => prop_assert!(!letter.reason.is_empty()),
        }
    }

    #[test]
    fn config_parsing_never_panics(text in "(\\[\\[?[a-z]{1,8}\\]\\]?\n|[a-z_]{1,12} = (\"[^\"\n]{0,20}\"|[0-9]{1,5}|true)\n){0,12}") {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), &text).unwrap();
        // Either a configuration or an error naming the file: never a panic.
        if let Err(error) = dweetpipe::config::Config::load_with_env(file.path(), |_| None) {
            prop_assert!(error.to_string().contains(".toml"), "{}", error);
        }
    }
}

/// The reference flattening: each number or boolean by its dotted path, as a `Value` reads it.
fn leaves(value: &Value, path: &mut String, out: &mut Vec<(String, u64)>) {
    let mut descend = |name: &str, child: &Value, path: &mut String| {
        let parent = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(name);
        leaves(child, path, out);
        path.truncate(parent);
    };
    match value {
        Value::Object(map) => map
            .iter()
            .for_each(|(name, child)| descend(name, child, path)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(index, child)| descend(&index.to_string(), child, path)),
        Value::Number(number) => {
            out.push((path.clone(), number.as_f64().unwrap_or(f64::NAN).to_bits()))
        }
        Value::Bool(flag) => out.push((path.clone(), f64::from(u8::from(*flag)).to_bits())),
        _ => {}
    }
}

fn count_numbers(value: &Value) -> usize {
    match value {
        Value::Number(_) | Value::Bool(_) => 1,
        Value::Array(items) => items.iter().map(count_numbers).sum(),
        Value::Object(map) => map.values().map(count_numbers).sum(),
        _ => 0,
    }
}

/// Found by the properties above: serde_json's default float parser could be one ULP off, so a
/// dweet's content changed on its way through. Fixed with serde_json's `float_roundtrip`.
#[test]
fn regression_floats_survive_decoding_exactly() {
    for value in [1.5816025312092487e59, -1.0677582119966867e-51] {
        let dweet = Dweet {
            thing: "a".into(),
            created: Created::new("2026-01-01T00:00:00.000Z"),
            content: json!({ "v": value }),
            transaction: None,
        };
        let mut decoder = FrameDecoder::new();
        decoder.push(&encode_stream_frame(
            &serde_json::to_string(&dweet).unwrap(),
        ));
        assert_eq!(decoder.next_event(), Some(Decoded::Dweet(dweet.clone())));
        let Record::Dweet(normalized) = normalize(&dweet, 0) else {
            panic!("a dweet")
        };
        assert_eq!(normalized.readings[0].value, value);
    }
}
