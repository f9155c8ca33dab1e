//! Time buckets and the aggregates `query --every` computes in them: pure, so DuckDB's answers
//! can be compared with these in tests and the edge cases live in one table.

use std::fmt;
use std::str::FromStr;

/// What a bucket reports of its readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Avg,
    Min,
    Max,
    Count,
    /// The value of the newest reading in the bucket.
    Last,
}

impl Aggregate {
    pub const ALL: [Aggregate; 5] = [
        Aggregate::Avg,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Count,
        Aggregate::Last,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Avg => "avg",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Count => "count",
            Aggregate::Last => "last",
        }
    }
}

impl fmt::Display for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Aggregate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Aggregate::ALL
            .into_iter()
            .find(|a| a.name() == text)
            .ok_or_else(|| {
                format!("{text:?} is not an aggregate; use avg, min, max, count or last")
            })
    }
}

/// The start of the `every_ms`-wide bucket holding `ms`, aligned to the Unix epoch (so a day
/// is a UTC day).
pub fn bucket_start(ms: i64, every_ms: i64) -> i64 {
    ms.div_euclid(every_ms) * every_ms
}

/// The running state of one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulator {
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
    last_ms: i64,
    last: f64,
}

impl Accumulator {
    pub fn new(ms: i64, value: f64) -> Self {
        Accumulator {
            n: 1,
            sum: value,
            min: value,
            max: value,
            last_ms: ms,
            last: value,
        }
    }

    pub fn add(&mut self, ms: i64, value: f64) {
        self.n += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        if ms >= self.last_ms {
            self.last_ms = ms;
            self.last = value;
        }
    }

    /// The time of the newest reading seen.
    pub fn last_ms(&self) -> i64 {
        self.last_ms
    }

    pub fn value(&self, aggregate: Aggregate) -> f64 {
        match aggregate {
            Aggregate::Avg => self.sum / self.n as f64,
            Aggregate::Min => self.min,
            Aggregate::Max => self.max,
            Aggregate::Count => self.n as f64,
            Aggregate::Last => self.last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_epoch_aligned_on_both_sides_of_1970() {
        const MINUTE: i64 = 60_000;
        for (ms, every, start) in [
            (0, MINUTE, 0),
            (59_999, MINUTE, 0),
            (60_000, MINUTE, MINUTE),
            (-1, MINUTE, -MINUTE),
            (1_796_256_000_000 + 5, 86_400_000, 1_796_256_000_000),
        ] {
            assert_eq!(bucket_start(ms, every), start, "{ms} in {every}");
        }
    }

    #[test]
    fn aggregates_of_a_bucket() {
        // Out of time order, as rows from two files of one date arrive.
        let mut bucket = Accumulator::new(2_000, 4.0);
        for (ms, value) in [(1_000, 1.0), (3_000, -2.0), (2_500, 10.0)] {
            bucket.add(ms, value);
        }
        let expected = [
            (Aggregate::Avg, 13.0 / 4.0),
            (Aggregate::Min, -2.0),
            (Aggregate::Max, 10.0),
            (Aggregate::Count, 4.0),
            (Aggregate::Last, -2.0),
        ];
        for (aggregate, value) in expected {
            assert_eq!(bucket.value(aggregate), value, "{aggregate}");
        }
        assert_eq!(bucket.last_ms(), 3_000);
    }

    #[test]
    fn aggregate_names_round_trip_and_others_are_refused() {
        for aggregate in Aggregate::ALL {
            assert_eq!(aggregate.name().parse::<Aggregate>(), Ok(aggregate));
        }
        assert!(
            "mean"
                .parse::<Aggregate>()
                .unwrap_err()
                .contains("avg, min")
        );
    }
}
