//! Value parsers for numeric flags: every count, interval and limit a verb takes is checked
//! by clap against a range, so 0, -1 or 1e300 get a usage error naming the flag instead of a
//! panic or a silent no-op further in.

use std::time::Duration;

use clap::builder::RangedU64ValueParser;

/// A whole number from `min` to `max`.
pub fn whole(min: u64, max: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(min..=max)
}

/// A whole number from `min` to `max`, as u64.
pub fn whole_u64(min: u64, max: u64) -> RangedU64ValueParser<u64> {
    RangedU64ValueParser::<u64>::new().range(min..=max)
}

/// A whole number from `min` to `max`, as u32.
pub fn whole_u32(min: u64, max: u64) -> RangedU64ValueParser<u32> {
    RangedU64ValueParser::<u32>::new().range(min..=max)
}

fn above_zero(text: &str, max: f64, unit: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !value.is_finite() || value <= 0.0 || value > max {
        return Err(format!("must be above 0 and at most {max} {unit}"));
    }
    Ok(value)
}

/// Seconds between two events: above 0, at most a day (fractions allowed).
pub fn interval_seconds(text: &str) -> Result<f64, String> {
    above_zero(text, 86_400.0, "seconds")
}

/// Seconds to wait or run: above 0, at most a year.
pub fn timeout_seconds(text: &str) -> Result<f64, String> {
    above_zero(text, 365.0 * 86_400.0, "seconds")
}

/// A rate: above 0, at most a million a second.
pub fn per_second(text: &str) -> Result<f64, String> {
    above_zero(text, 1_000_000.0, "per second")
}

/// A human duration ("50ms", "24h") above zero.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be above zero".to_owned());
    }
    Ok(duration)
}
