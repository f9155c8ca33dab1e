//! Records as COPY rows, in the binary format: PostgreSQL takes its timestamps and doubles as
//! they are instead of parsing text, and nothing needs escaping. (The text format `psql \copy`
//! loads lives in the bench harness, the only thing that needs it.)

use crate::record::Normalized;

/// The binary COPY streams of one batch, each with its header and trailer.
pub struct BinaryRows {
    pub dweets: Vec<u8>,
    pub readings: Vec<u8>,
    pub dweet_count: usize,
    pub reading_count: usize,
}

/// `PGCOPY\n\377\r\n\0`, no flags, no header extension.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
const BINARY_TRAILER: &[u8] = &(-1i16).to_be_bytes();
/// 2000-01-01T00:00:00Z, PostgreSQL's epoch, in Unix milliseconds.
const POSTGRES_EPOCH_MS: i64 = 946_684_800_000;
/// jsonb's binary input: a version byte, then the JSON text.
const JSONB_VERSION: u8 = 1;

impl Default for BinaryRows {
    fn default() -> Self {
        BinaryRows {
            dweets: BINARY_HEADER.to_vec(),
            readings: BINARY_HEADER.to_vec(),
            dweet_count: 0,
            reading_count: 0,
        }
    }
}

impl BinaryRows {
    /// The finished streams of `dweets`.
    pub fn of<'a>(dweets: impl IntoIterator<Item = &'a Normalized>) -> Self {
        let mut rows = BinaryRows::default();
        dweets.into_iter().for_each(|dweet| rows.push_dweet(dweet));
        rows.finish()
    }

    /// `thing, created, received_at, content` and `time, thing, sensor, value`.
    fn push_dweet(&mut self, dweet: &Normalized) {
        let created = binary_timestamp(dweet.created_ms);
        let out = &mut self.dweets;
        out.extend_from_slice(&4i16.to_be_bytes());
        push_binary(out, dweet.thing.as_bytes());
        push_binary(out, &created);
        push_binary(out, &binary_timestamp(dweet.received_ms));
        push_binary_len(out, dweet.content.len() + 1);
        out.push(JSONB_VERSION);
        out.extend_from_slice(dweet.content.as_bytes());
        self.dweet_count += 1;
        let out = &mut self.readings;
        for reading in &dweet.readings {
            out.extend_from_slice(&4i16.to_be_bytes());
            push_binary(out, &created);
            push_binary(out, dweet.thing.as_bytes());
            push_binary(out, reading.sensor.as_bytes());
            push_binary(out, &reading.value.to_bits().to_be_bytes());
        }
        self.reading_count += dweet.readings.len();
    }

    /// The two streams, each ended by its trailer.
    fn finish(mut self) -> Self {
        self.dweets.extend_from_slice(BINARY_TRAILER);
        self.readings.extend_from_slice(BINARY_TRAILER);
        self
    }
}

/// Microseconds since PostgreSQL's epoch, as `timestamptz` travels.
fn binary_timestamp(ms: i64) -> [u8; 8] {
    ms.saturating_sub(POSTGRES_EPOCH_MS)
        .saturating_mul(1000)
        .to_be_bytes()
}

fn push_binary_len(out: &mut Vec<u8>, len: usize) {
    // A field over 2 GiB cannot be sent; saturating makes PostgreSQL refuse that row (and
    // the batch's bisection dead-letters it) instead of misreading the stream.
    out.extend_from_slice(&i32::try_from(len).unwrap_or(i32::MAX).to_be_bytes());
}

fn push_binary(out: &mut Vec<u8>, field: &[u8]) {
    push_binary_len(out, field.len());
    out.extend_from_slice(field);
}

/// PostgreSQL text cannot hold NUL; a dead letter must always be storable, so NUL becomes
/// U+FFFD there (dweets and readings keep theirs and are refused, then dead-lettered).
pub fn without_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Reading;

    #[test]
    fn nul_becomes_a_replacement_character() {
        assert_eq!(without_nul("nul\0here"), "nul\u{FFFD}here");
        assert!(matches!(
            without_nul("clean"),
            std::borrow::Cow::Borrowed("clean")
        ));
    }

    #[test]
    fn binary_rows_follow_the_copy_binary_layout() {
        let rows = BinaryRows::of(&[Normalized {
            thing: "t".to_owned(),
            // 2000-01-01T00:00:01.5Z: 1.5 s after PostgreSQL's epoch.
            created_ms: POSTGRES_EPOCH_MS + 1500,
            created_text: None,
            received_ms: POSTGRES_EPOCH_MS,
            content: "{}".to_owned(),
            readings: vec![Reading {
                sensor: "v".into(),
                value: -0.0,
            }],
        }]);
        assert_eq!((rows.dweet_count, rows.reading_count), (1, 1));
        let header = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
        let mut dweet = header.to_vec();
        dweet.extend_from_slice(&[0, 4]);
        dweet.extend_from_slice(&[0, 0, 0, 1, b't']);
        dweet.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0x16, 0xe3, 0x60]);
        dweet.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        dweet.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}']);
        dweet.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(rows.dweets, dweet);
        let mut reading = header.to_vec();
        reading.extend_from_slice(&[0, 4]);
        reading.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0x16, 0xe3, 0x60]);
        reading.extend_from_slice(&[0, 0, 0, 1, b't', 0, 0, 0, 1, b'v']);
        reading.extend_from_slice(&[0, 0, 0, 8, 0x80, 0, 0, 0, 0, 0, 0, 0]);
        reading.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(rows.readings, reading);
    }
}
