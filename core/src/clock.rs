//! `current_time` for `rate_limit` scripts, in the zone the config names
//! (`limits.time_zone`, docs/adr/041). The default is the machine's local
//! zone (`TZ`, else the system's), so the seed's "peak hours 9-18" rule
//! means the deployment's 9-18 without configuration; `UTC` or a fixed
//! offset overrides it. Every host computes it here.

use chrono::{DateTime, Datelike, FixedOffset, Local, Offset, Timelike, Utc};

use crate::config::parse_utc_offset;
use crate::hooks::CurrentTime;

/// The zone of `current_time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// The machine's local zone (`TZ`, else the system's), with its
    /// daylight saving rules.
    Local,
    /// A fixed offset in seconds east of UTC (`UTC` is 0).
    Fixed(i32),
}

impl Zone {
    /// Parse `local`, `UTC`, `Z` or a fixed offset (`+08:00`, `-0530`, `+8`).
    pub fn parse(text: &str) -> Result<Zone, String> {
        if text.trim().eq_ignore_ascii_case("local") {
            return Ok(Zone::Local);
        }
        parse_utc_offset(text)
            .map(Zone::Fixed)
            .map_err(|_| format!("'{text}' is not local, UTC or a fixed offset such as +08:00"))
    }

    /// The offset from UTC at `now`, in seconds east.
    pub fn offset_at(self, now: DateTime<Utc>) -> i32 {
        match self {
            Zone::Local => now.with_timezone(&Local).offset().fix().local_minus_utc(),
            Zone::Fixed(s) => s,
        }
    }

    /// How `llmproxy check` and logs name the zone in effect at `now`:
    /// `local (TZ=Asia/Shanghai, UTC+08:00 now)`, `UTC+08:00`.
    pub fn describe(self, now: DateTime<Utc>) -> String {
        let offset = format_offset(self.offset_at(now));
        match self {
            Zone::Local => match std::env::var("TZ") {
                Ok(tz) if !tz.is_empty() => format!("local (TZ={tz}, {offset} now)"),
                _ => format!("local (system zone, {offset} now)"),
            },
            Zone::Fixed(_) => offset,
        }
    }
}

/// `UTC+08:00`, `UTC-05:30`, `UTC+00:00`.
fn format_offset(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let m = seconds.unsigned_abs() / 60;
    format!("UTC{sign}{:02}:{:02}", m / 60, m % 60)
}

/// `current_time` at `now` in `zone`: hour 0-23, weekday 1 = Monday … 7 =
/// Sunday, and the Unix timestamp (the same in every zone).
pub fn current_time(now: DateTime<Utc>, zone: Zone) -> CurrentTime {
    let offset = FixedOffset::east_opt(zone.offset_at(now)).unwrap_or_else(|| Utc.fix());
    let local = now.with_timezone(&offset);
    CurrentTime {
        hour: local.hour(),
        weekday: local.weekday().number_from_monday(),
        timestamp: now.timestamp(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_zones_shift_the_hour_and_weekday_but_not_the_timestamp() {
        // 2024-01-16 (a Tuesday) 20:00:00 UTC.
        let now = DateTime::parse_from_rfc3339("2024-01-16T20:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap();
        // (zone text, hour, weekday)
        let cases = [("UTC", 20, 2), ("+08:00", 4, 3), ("-05:30", 14, 2), ("+05:45", 1, 3)];
        for (text, hour, weekday) in cases {
            let z = Zone::parse(text).unwrap();
            let t = current_time(now, z);
            assert_eq!(
                (t.hour, t.weekday, t.timestamp),
                (hour, weekday, now.timestamp()),
                "{text}"
            );
        }
        assert_eq!(Zone::parse("Local"), Ok(Zone::Local));
        assert!(Zone::parse("Mars").unwrap_err().contains("local, UTC"));
        assert_eq!(Zone::parse("+08:00").unwrap().describe(now), "UTC+08:00");
        assert_eq!(Zone::Fixed(-19800).describe(now), "UTC-05:30");
    }
}
