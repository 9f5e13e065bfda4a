//! Which upload bandwidth limit of a policy applies at a given instant.

use jiff::Timestamp;
use jiff::civil::Weekday as CivilWeekday;
use jiff::tz::TimeZone;
use siterecovery_api::policy::{Bandwidth, Weekday};

fn civil(d: &Weekday) -> CivilWeekday {
    match d {
        Weekday::Mon => CivilWeekday::Monday,
        Weekday::Tue => CivilWeekday::Tuesday,
        Weekday::Wed => CivilWeekday::Wednesday,
        Weekday::Thu => CivilWeekday::Thursday,
        Weekday::Fri => CivilWeekday::Friday,
        Weekday::Sat => CivilWeekday::Saturday,
        Weekday::Sun => CivilWeekday::Sunday,
    }
}

fn minutes(hhmm: &str) -> Option<i32> {
    let (h, m) = hhmm.split_once(':')?;
    Some(h.parse::<i32>().ok()? * 60 + m.parse::<i32>().ok()?)
}

/// Bytes per second allowed at `now` (0: unlimited). The first window containing `now`
/// (in the policy's time zone) wins; a window crossing midnight belongs to the day it
/// starts on. An unknown time zone is read as UTC.
pub fn limit_at(bandwidth: &Bandwidth, now: Timestamp) -> u64 {
    let tz = TimeZone::get(&bandwidth.time_zone).unwrap_or(TimeZone::UTC);
    let local = now.to_zoned(tz).datetime();
    let minute = i32::from(local.hour()) * 60 + i32::from(local.minute());
    let today = local.weekday();
    let yesterday = today.wrapping_sub(1);
    let applies = |days: &[Weekday], day: CivilWeekday| days.is_empty() || days.iter().any(|d| civil(d) == day);
    let mbps = bandwidth
        .windows
        .iter()
        .find(|w| {
            let (Some(start), Some(end)) = (minutes(&w.start), minutes(&w.end)) else { return false };
            if start < end {
                applies(&w.days, today) && (start..end).contains(&minute)
            } else {
                (applies(&w.days, today) && minute >= start) || (applies(&w.days, yesterday) && minute < end)
            }
        })
        .map_or(bandwidth.limit_mbps, |w| w.limit_mbps);
    u64::from(mbps) * 1_000_000 / 8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(json: serde_json::Value) -> Bandwidth {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn windows_pick_the_limit() {
        let b = bw(serde_json::json!({
            "limitMbps": 100, "timeZone": "Europe/Berlin",
            "windows": [
                {"days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "start": "08:00", "end": "18:00", "limitMbps": 10},
                {"start": "22:00", "end": "06:00", "limitMbps": 0}
            ]
        }));
        // Friday 2026-11-27 09:00 UTC is 10:00 in Berlin: office hours.
        assert_eq!(limit_at(&b, "2026-11-27T09:00:00Z".parse().unwrap()), 10 * 125_000);
        // 20:00 Berlin: the default.
        assert_eq!(limit_at(&b, "2026-11-27T19:00:00Z".parse().unwrap()), 100 * 125_000);
        // Saturday 03:00 Berlin: inside the night window that started on Friday: unlimited.
        assert_eq!(limit_at(&b, "2026-11-28T02:00:00Z".parse().unwrap()), 0);
        // Saturday 10:00: office-hours window does not apply at weekends.
        assert_eq!(limit_at(&b, "2026-11-28T09:00:00Z".parse().unwrap()), 100 * 125_000);
    }
}
