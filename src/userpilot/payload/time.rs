//! Event times as Userpilot may write them (contract §2.2): unix seconds or milliseconds, as a
//! number or a numeric string, RFC 3339 / ISO 8601 with or without an offset. A time outside
//! 1970 to 9999 counts as absent, so the decoder tries the next place. Pure.

use chrono::{DateTime, Datelike, NaiveDateTime, Utc};
use serde_json::{Number, Value};

/// ISO 8601 with a numeric offset that RFC 3339 refuses (`+0200`, or a space before it).
const WITH_OFFSET: [&str; 2] = ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"];
/// ISO 8601 without an offset, taken as UTC; `%.f` also matches no fraction at all.
const NAIVE: [&str; 2] = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"];

/// Unix times above this are milliseconds: 10^12 seconds is about the year 33658, while 10^12
/// milliseconds is September 2001, so the two ranges that matter never overlap.
pub(super) const MILLIS_ABOVE: i64 = 1_000_000_000_000;

/// A point in time from a JSON number or string; `None` when it does not parse or lies outside
/// [`in_range`], so that the caller tries the next place (and the mapper, in the end, uses the
/// receive time).
pub(super) fn time(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::Number(number) => time_from_number(number),
        Value::String(raw) => time_from_text(raw.trim()),
        _ => None,
    }
    .filter(in_range)
}

/// After the Unix epoch and before the year 10000. Userpilot has no events from before 1970, so
/// a zero or negative Unix time (or a date before 1970) is a placeholder or a bug, not a time
/// worth sending as 1969; past 9999 RFC 3339 has no form Heap can read.
fn in_range(time: &DateTime<Utc>) -> bool {
    *time > DateTime::UNIX_EPOCH && time.year() <= 9999
}

fn time_from_number(number: &Number) -> Option<DateTime<Utc>> {
    if let Some(int) = number.as_i64() {
        return time_from_unix(int);
    }
    if number.is_u64() {
        // Above i64::MAX: no representable instant in either unit.
        return None;
    }
    // A fraction or exponent, or an integer beyond u64 (read as a float far out of range).
    // `as_f64` is `None` for a number beyond f64 (`1e400`), which is then no time either.
    time_from_unix_float(number.as_f64()?)
}

/// Unix seconds, or milliseconds above [`MILLIS_ABOVE`].
fn time_from_unix(int: i64) -> Option<DateTime<Utc>> {
    if int > MILLIS_ABOVE {
        DateTime::from_timestamp_millis(int)
    } else {
        DateTime::from_timestamp(int, 0)
    }
}

/// As [`time_from_unix`], for fractional values; kept to the microsecond, which is both the
/// precision an `f64` holds for present-day times and the finest Userpilot documents.
fn time_from_unix_float(float: f64) -> Option<DateTime<Utc>> {
    let seconds = if float > MILLIS_ABOVE as f64 {
        float / 1000.0
    } else {
        float
    };
    let micros = (seconds * 1e6).round();
    // `as` would saturate rather than fail; refuse anything it cannot hold exactly instead.
    if !micros.is_finite() || micros.abs() >= i64::MAX as f64 {
        return None;
    }
    DateTime::from_timestamp_micros(micros as i64)
}

/// A numeric string (read as a Unix time), an ISO 8601 time with `Z` or an offset, or a naive
/// ISO 8601 time taken as UTC (Data Sync's `inserted_at` is UTC without a marker).
fn time_from_text(raw: &str) -> Option<DateTime<Utc>> {
    if let Ok(int) = raw.parse::<i64>() {
        return time_from_unix(int);
    }
    if let Ok(float) = raw.parse::<f64>() {
        // Also catches `NaN`, `inf` and integers beyond i64: numeric, so never a date.
        return time_from_unix_float(float);
    }
    if let Ok(time) = DateTime::parse_from_rfc3339(raw) {
        return Some(time.to_utc());
    }
    if let Some(time) = WITH_OFFSET
        .iter()
        .find_map(|format| DateTime::parse_from_str(raw, format).ok())
    {
        return Some(time.to_utc());
    }
    NAIVE
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(raw, format).ok())
        .map(|naive| naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn utc(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn times_are_read_in_every_accepted_format() {
        let cases = [
            (json!(1726742461), "2024-09-19T10:41:01Z"),
            (json!(1726742461123_i64), "2024-09-19T10:41:01.123Z"),
            (json!(1726742461.5), "2024-09-19T10:41:01.500Z"),
            (json!(1726742461.123), "2024-09-19T10:41:01.123Z"),
            (json!(1726742461123.0), "2024-09-19T10:41:01.123Z"),
            (json!(1), "1970-01-01T00:00:01Z"),
            // One above the unit boundary is milliseconds (10^12 itself: see below).
            (json!(1_000_000_000_001_i64), "2001-09-09T01:46:40.001Z"),
            (json!("1726742461"), "2024-09-19T10:41:01Z"),
            (json!(" 1726742461123 "), "2024-09-19T10:41:01.123Z"),
            (json!("1726742461.25"), "2024-09-19T10:41:01.250Z"),
            (json!("2024-09-19T10:41:01Z"), "2024-09-19T10:41:01Z"),
            (
                json!("2024-09-19T10:41:01.123456Z"),
                "2024-09-19T10:41:01.123456Z",
            ),
            (json!("2024-09-19T12:41:01+02:00"), "2024-09-19T10:41:01Z"),
            (
                json!("2024-09-19T05:41:01.5-05:00"),
                "2024-09-19T10:41:01.500Z",
            ),
            (json!("2024-09-19T12:41:01+0200"), "2024-09-19T10:41:01Z"),
            (json!("2024-09-19 12:41:01+02:00"), "2024-09-19T10:41:01Z"),
            (json!("2024-09-19 10:41:01"), "2024-09-19T10:41:01Z"),
            (
                json!("2024-09-19 10:41:01.123456"),
                "2024-09-19T10:41:01.123456Z",
            ),
            (json!("2024-09-19T10:41:01"), "2024-09-19T10:41:01Z"),
            (json!("2024-09-19T10:41:01.5"), "2024-09-19T10:41:01.500Z"),
        ];
        for (value, expected) in cases {
            assert_eq!(time(&value), Some(utc(expected)), "{value}");
        }
        // 10^12 itself is read as seconds: year 33658, beyond what Heap can read, so none.
        assert_eq!(time(&json!(MILLIS_ABOVE)), None, "10^12 itself is seconds");
    }

    #[test]
    fn unreadable_or_out_of_range_times_are_none_without_panicking() {
        let cases = [
            json!("soon"),
            json!(""),
            json!("2024-09-19"),
            json!("2024-13-40T10:41:01Z"),
            json!("NaN"),
            json!("inf"),
            json!("-infinity"),
            json!("1e400"),
            json!("99999999999999999999999999"),
            json!(1e300),
            json!(-1e300),
            json!(f64::MAX),
            json!(i64::MAX),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(0),
            json!(-1),
            json!(-1726742461),
            json!(-1726742461123_i64),
            json!(-0.5),
            json!("0"),
            json!("-1726742461"),
            json!("1969-12-31T23:59:59Z"),
            json!("1970-01-01T00:00:00Z"),
            json!("0001-01-01T00:00:00Z"),
            json!(true),
            Value::Null,
            json!([1726742461]),
            json!({"seconds": 1726742461}),
        ];
        for value in cases {
            assert_eq!(time(&value), None, "{value}");
        }
    }
}
