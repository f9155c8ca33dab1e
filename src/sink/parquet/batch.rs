//! Arrow schemas of the three datasets and the row buffers that turn records into record
//! batches.

use std::sync::Arc;

use arrow_array::builder::{ArrayBuilder, StringBuilder};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, TimestampMillisecondArray};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};

use super::names::NameKeys;
use crate::record::{DeadLetter, Normalized};
use crate::telemetry::Table;

/// Text columns whose every row differs: a dweet's content and a dead letter's payload.
pub const UNIQUE_TEXT_COLUMNS: [&str; 2] = ["content", "payload"];

/// Columns whose values rarely repeat within a file: times (a reading's repeats only across
/// one dweet's sensors).
pub const SELDOM_REPEATED_COLUMNS: [&str; 3] = ["time", "created", "received_at"];

/// Measured values. A board's sensors report whole numbers or two decimals, so a file holds
/// a few thousand distinct values among hundreds of thousands of readings, and a dictionary
/// holds a reading in 12 to 17 bits instead of a double's 64; with zstd at its default level
/// that was 20.8 bytes of values a dweet from the simulator's boards, against 104 for the
/// doubles.
/// Doubles that never repeat cost 6% more instructions and 9% more bytes until the
/// dictionary fills and falls back to plain; a smaller limit bounded that but lost the
/// import's gain. The sink writes them uncompressed, compaction at zstd's default level (see
/// `quantised_compression`).
pub const QUANTISED_COLUMNS: [&str; 1] = ["value"];

/// Names that repeat row after row (a board on each of its readings, the same sensors in
/// every dweet). Written plain as they arrive: interning every row into a dictionary cost
/// about 1,400 instructions a dweet, and zstd folds the repeats instead (37.4 bytes a dweet
/// became 39.5). Compaction gives them their dictionary back for the files kept long. The
/// readings rows hold them as keys until they are written (see `names`).
pub const NAME_COLUMNS: [&str; 2] = ["thing", "sensor"];

/// Columns that are timestamps in every dataset that has them (not `created`: a dead
/// letter keeps it as the text it came as). The datasets share their writer properties but
/// for names, and an integer encoding on a text column makes the writer refuse to start.
pub const TIME_COLUMNS: [&str; 2] = ["time", "received_at"];

/// Columns whose minimum and maximum never let a reader skip anything in a file as the sink
/// writes it: every file and page holds each board's whole set of sensors, and every board
/// that dweeted in its seconds, interleaved. Comparing each row's `thing` for them cost
/// about 1,400 instructions a dweet. Compaction sorts a date by board and gives `thing` its
/// statistics back, which is where a reader skips other boards. `value` too: as written,
/// each page holds every sensor of its boards (an S5D9's -1 of an accelerometer beside 1,000
/// of pressure), so a filter on values skips nothing, and they cost 300 instructions a
/// dweet. Compaction gives them back, where a board that sends one sensor has pages of a
/// narrow range.
pub const UNPRUNABLE_COLUMNS: [&str; 3] = ["sensor", "thing", "value"];

/// The datasets under `[parquet] dir`, each its own folder of `date=YYYY-MM-DD/` partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dataset {
    /// `time, thing, sensor, value`: one row per numeric leaf.
    Readings,
    /// `thing, created, received_at, content`: the lossless raw dweets.
    Dweets,
    /// `thing, created, received_at, payload, reason`.
    DeadLetters,
}

impl Dataset {
    pub const ALL: [Dataset; 3] = [Dataset::Readings, Dataset::Dweets, Dataset::DeadLetters];

    /// Whether a file of this dataset writes its names plain (see [`NAME_COLUMNS`]). Only
    /// `readings` repeats them on every row: where a board's name comes once a dweet, one
    /// dictionary lookup costs less than zstd spends finding the repeats among a fleet's
    /// interleaved names (150 instructions a dweet fewer over 20 boards, 2% fewer bytes).
    pub fn writes_names_plain(self) -> bool {
        self == Dataset::Readings
    }

    pub fn dir_name(self) -> &'static str {
        match self {
            Dataset::Readings => "readings",
            Dataset::Dweets => "dweets",
            Dataset::DeadLetters => "dead_letters",
        }
    }

    /// The column that says when a row happened: compaction sorts by it within a board.
    pub fn time_column(self) -> &'static str {
        match self {
            Dataset::Readings => "time",
            Dataset::Dweets => "created",
            Dataset::DeadLetters => "received_at",
        }
    }

    /// The metrics' name for this dataset.
    pub fn table(self) -> Table {
        match self {
            Dataset::Readings => Table::Readings,
            Dataset::Dweets => Table::Dweets,
            Dataset::DeadLetters => Table::DeadLetters,
        }
    }

    pub fn schema(self) -> SchemaRef {
        let time = |name: &str| {
            Field::new(
                name,
                DataType::Timestamp(TimeUnit::Millisecond, Some(TIME_ZONE.into())),
                false,
            )
        };
        let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
        Arc::new(Schema::new(match self {
            Dataset::Readings => vec![
                time("time"),
                text("thing", false),
                text("sensor", false),
                Field::new("value", DataType::Float64, false),
            ],
            Dataset::Dweets => vec![
                text("thing", false),
                time("created"),
                time("received_at"),
                // Parquet's JSON logical type: DuckDB and Spark read it as JSON.
                text("content", false)
                    .with_extension_type(arrow_schema::extension::Json::default()),
            ],
            Dataset::DeadLetters => vec![
                text("thing", true),
                text("created", true),
                time("received_at"),
                text("payload", false),
                text("reason", false),
            ],
        }))
    }

    /// The schema of the batches the sink hands `parquet`: the file's [`schema`](Self::schema)
    /// but for the readings' names, which arrive as keys into the names a file has seen
    /// (see `names`) and are written as their text.
    pub fn batch_schema(self) -> SchemaRef {
        let file = self.schema();
        if self != Dataset::Readings {
            return file;
        }
        let keyed = DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8));
        let fields: Vec<Field> = file
            .fields()
            .iter()
            .map(|field| {
                let field = field.as_ref().clone();
                if NAME_COLUMNS.contains(&field.name().as_str()) {
                    field.with_data_type(keyed.clone())
                } else {
                    field
                }
            })
            .collect();
        Arc::new(Schema::new(fields))
    }
}

/// The time zone of every time column: times are milliseconds since the epoch, in UTC.
const TIME_ZONE: &str = "UTC";

/// Rows of one dataset waiting to become a record batch. Times and values, never null, are
/// plain vectors: they become their columns without a copy, and need none of a builder's
/// checks for nulls.
pub enum Rows {
    Readings {
        time: Vec<i64>,
        thing: Vec<u32>,
        sensor: Vec<u32>,
        value: Vec<f64>,
        /// Boxed: the names' maps and builders would make every variant several times the
        /// size of the others.
        names: Box<NameKeys>,
    },
    Dweets {
        thing: StringBuilder,
        created: Vec<i64>,
        received_at: Vec<i64>,
        content: StringBuilder,
    },
    DeadLetters {
        thing: StringBuilder,
        created: StringBuilder,
        received_at: Vec<i64>,
        payload: StringBuilder,
        reason: StringBuilder,
    },
}

impl Rows {
    pub fn new(dataset: Dataset) -> Self {
        match dataset {
            Dataset::Readings => Rows::Readings {
                time: Vec::new(),
                thing: Vec::new(),
                sensor: Vec::new(),
                value: Vec::new(),
                names: Box::default(),
            },
            Dataset::Dweets => Rows::Dweets {
                thing: StringBuilder::new(),
                created: Vec::new(),
                received_at: Vec::new(),
                content: StringBuilder::new(),
            },
            Dataset::DeadLetters => Rows::DeadLetters {
                thing: StringBuilder::new(),
                created: StringBuilder::new(),
                received_at: Vec::new(),
                payload: StringBuilder::new(),
                reason: StringBuilder::new(),
            },
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::Readings { value, .. } => value.len(),
            Rows::Dweets { content, .. } => content.len(),
            Rows::DeadLetters { reason, .. } => reason.len(),
        }
    }

    /// Appends the readings of a dweet (to `Readings`) or the dweet itself (to `Dweets`).
    pub fn push_dweet(&mut self, dweet: &Normalized) {
        match self {
            Rows::Readings {
                time,
                thing,
                sensor,
                value,
                names,
            } => {
                // The dweet's time and board repeat on each of its readings: appended as
                // runs, column by column.
                time.resize(time.len() + dweet.readings.len(), dweet.created_ms);
                names.push(&dweet.thing, &dweet.readings, thing, sensor);
                value.extend(dweet.readings.iter().map(|reading| reading.value));
            }
            Rows::Dweets {
                thing,
                created,
                received_at,
                content,
            } => {
                thing.append_value(&dweet.thing);
                created.push(dweet.created_ms);
                received_at.push(dweet.received_ms);
                content.append_value(&dweet.content);
            }
            Rows::DeadLetters { .. } => {}
        }
    }

    pub fn push_dead_letter(&mut self, letter: &DeadLetter) {
        if let Rows::DeadLetters {
            thing,
            created,
            received_at,
            payload,
            reason,
        } = self
        {
            thing.append_option(letter.thing.as_deref());
            created.append_option(letter.created.as_deref());
            received_at.push(letter.received_ms);
            payload.append_value(&letter.payload);
            reason.append_value(&letter.reason);
        }
    }

    /// Takes the buffered rows as a batch, leaving the buffer empty but sized for another
    /// batch like it: grown from nothing each time, the builders spent more instructions
    /// copying themselves than the rows cost.
    pub fn take_batch(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = match self {
            Rows::Readings {
                time,
                thing,
                sensor,
                value,
                names,
            } => vec![
                take_times(time),
                names.things_column(take_sized(thing))?,
                names.sensors_column(take_sized(sensor))?,
                Arc::new(Float64Array::new(take_sized(value).into(), None)),
            ],
            Rows::Dweets {
                thing,
                created,
                received_at,
                content,
            } => vec![
                take_text(thing),
                take_times(created),
                take_times(received_at),
                take_text(content),
            ],
            Rows::DeadLetters {
                thing,
                created,
                received_at,
                payload,
                reason,
            } => vec![
                take_text(thing),
                take_text(created),
                take_times(received_at),
                take_text(payload),
                take_text(reason),
            ],
        };
        RecordBatch::try_new(Arc::clone(schema), columns)
    }
}

fn take_text(builder: &mut StringBuilder) -> ArrayRef {
    let (rows, bytes) = (builder.len(), builder.values_slice().len());
    let array = builder.finish();
    *builder = StringBuilder::with_capacity(rows, bytes);
    Arc::new(array)
}

/// What `values` holds, leaving it empty with room for as many.
fn take_sized<T>(values: &mut Vec<T>) -> Vec<T> {
    let room = Vec::with_capacity(values.len());
    std::mem::replace(values, room)
}

fn take_times(times: &mut Vec<i64>) -> ArrayRef {
    let times = take_sized(times).into();
    Arc::new(TimestampMillisecondArray::new(times, None).with_timezone(TIME_ZONE))
}

#[cfg(test)]
mod tests {
    use super::super::names::tests::texts;
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, TimestampMillisecondType};

    fn dweet(thing: &str, created_ms: i64, readings: &[(&str, f64)]) -> Normalized {
        match crate::record::test_dweet(thing, created_ms, readings) {
            crate::record::Record::Dweet(dweet) => dweet,
            other => panic!("test_dweet made {other:?}"),
        }
    }

    #[test]
    fn all_lists_the_datasets_in_their_declared_order() {
        // A generation counts its rows by `dataset as usize` into ALL's positions.
        for (position, dataset) in Dataset::ALL.into_iter().enumerate() {
            assert_eq!(dataset as usize, position, "{dataset:?}");
        }
    }

    #[test]
    fn each_reading_row_carries_its_dweets_time_and_board() {
        let mut rows = Rows::new(Dataset::Readings);
        rows.push_dweet(&dweet("a", 10, &[("t", 1.0), ("h", 2.0)]));
        rows.push_dweet(&dweet("b", 20, &[]));
        rows.push_dweet(&dweet("c", 30, &[("t", 3.0)]));
        for round in 0..2 {
            let batch = rows.take_batch(&Dataset::Readings.batch_schema()).unwrap();
            // The names come as keys into the names seen, which Parquet writes as text.
            let text = |column: usize| texts(batch.column(column));
            let times: Vec<i64> = batch
                .column(0)
                .as_primitive::<TimestampMillisecondType>()
                .values()
                .to_vec();
            let values: Vec<f64> = batch
                .column(3)
                .as_primitive::<Float64Type>()
                .values()
                .to_vec();
            assert_eq!(times, [10, 10, 30], "round {round}");
            assert_eq!(text(1), ["a", "a", "c"], "round {round}");
            assert_eq!(text(2), ["t", "h", "t"], "round {round}");
            assert_eq!(values, [1.0, 2.0, 3.0], "round {round}");
            // The buffers are left sized for another batch like it: the same rows again.
            rows.push_dweet(&dweet("a", 10, &[("t", 1.0), ("h", 2.0)]));
            rows.push_dweet(&dweet("c", 30, &[("t", 3.0)]));
        }
    }
}
