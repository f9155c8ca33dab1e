//! Records as COPY's text format (tab-separated, backslash escapes): what `psql \copy` loads
//! in the import benchmark's reference rows. The sink itself sends the binary format
//! (`src/sink/postgres/copy.rs`); this lives here because only the benchmark needs it.

use std::fmt::Write;

use dweetpipe::record::{Normalized, Record, ms_to_datetime};

/// The COPY text of one batch: `thing, created, received_at, content` and
/// `time, thing, sensor, value`.
#[derive(Default)]
pub struct CopyRows {
    pub dweets: String,
    pub readings: String,
}

impl CopyRows {
    /// The dweets among `records`.
    pub fn of<'a>(records: impl IntoIterator<Item = &'a Record>) -> Self {
        let mut rows = CopyRows::default();
        records
            .into_iter()
            .filter_map(Record::as_dweet)
            .for_each(|dweet| rows.push_dweet(dweet));
        rows
    }

    fn push_dweet(&mut self, dweet: &Normalized) {
        let created = timestamp(dweet.created_ms);
        push_field(&mut self.dweets, &dweet.thing);
        self.dweets.push('\t');
        self.dweets.push_str(&created);
        self.dweets.push('\t');
        self.dweets.push_str(&timestamp(dweet.received_ms));
        self.dweets.push('\t');
        push_field(&mut self.dweets, &dweet.content);
        self.dweets.push('\n');
        for reading in &dweet.readings {
            self.readings.push_str(&created);
            self.readings.push('\t');
            push_field(&mut self.readings, &dweet.thing);
            self.readings.push('\t');
            push_field(&mut self.readings, &reading.sensor);
            // f64's Display is the shortest text that reads back to the same value.
            let _ = writeln!(self.readings, "\t{}", reading.value);
        }
    }
}

fn timestamp(ms: i64) -> String {
    ms_to_datetime(ms)
        .format("%Y-%m-%d %H:%M:%S%.3f+00")
        .to_string()
}

fn push_field(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}
