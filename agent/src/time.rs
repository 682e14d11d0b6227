//! Wall-clock helpers: parsing `--expires` values and formatting timestamps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Nanoseconds since the epoch, now.
pub fn now_unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// RFC 3339 (UTC, seconds) for a Unix time.
pub fn format_unix(secs: i64) -> String {
    if secs < 0 {
        return format!("{secs} (before 1970)");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs as u64)).to_string()
}

/// Parses an expiry: a duration from `now` ("90d", "12h 30m") or a date/time ("2027-01-31",
/// "2027-01-31T12:00:00Z").
pub fn parse_expiry(s: &str, now: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now.saturating_add(d.as_secs() as i64));
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    match humantime::parse_rfc3339_weak(&full) {
        Ok(t) => Ok(t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)),
        Err(_) => Err(format!(
            "invalid expiry {s:?}: give a duration like \"90d\" or a date like \"2027-01-31\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_forms() {
        assert_eq!(parse_expiry("90d", 1000), Ok(1000 + 90 * 86400));
        assert_eq!(parse_expiry("2027-01-01", 0), Ok(1_798_761_600));
        assert_eq!(parse_expiry("2027-01-01T00:00:10Z", 0), Ok(1_798_761_610));
        assert!(parse_expiry("soon", 0).is_err());
        assert_eq!(format_unix(1_798_761_600), "2027-01-01T00:00:00Z");
    }
}
