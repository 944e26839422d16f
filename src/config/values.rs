//! Setting values with a syntax of their own: sizes (`20MiB`) and the daily reset (a time in a time zone).

use crate::clock::UnixMs;
use serde::Deserialize;

/// A size in bytes, written as a number or with a unit (`512KB`, `20MiB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        let bytes = match Raw::deserialize(d)? {
            Raw::Bytes(n) => Some(n),
            Raw::Text(text) => {
                let text = text.trim();
                let split = text
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(text.len());
                let number: Option<u64> = text[..split].parse().ok();
                let factor = match text[split..].trim().to_ascii_lowercase().as_str() {
                    "" | "b" => Some(1),
                    "kb" | "k" => Some(1000),
                    "kib" => Some(1024),
                    "mb" | "m" => Some(1_000_000),
                    "mib" => Some(1 << 20),
                    "gb" | "g" => Some(1_000_000_000),
                    "gib" => Some(1 << 30),
                    _ => None,
                };
                number.zip(factor).and_then(|(n, f)| n.checked_mul(f))
            }
        };
        bytes
            .and_then(|b| usize::try_from(b).ok())
            .map(ByteSize)
            .ok_or_else(|| {
                serde::de::Error::custom(
                    "expected a size such as 20MiB, 512KB or a number of bytes",
                )
            })
    }
}

/// When daily counters reset: a wall-clock time in a time zone.
#[derive(Clone, Debug)]
pub struct DailyReset {
    pub hour: i8,
    pub minute: i8,
    pub time_zone: jiff::tz::TimeZone,
}

impl DailyReset {
    /// The first reset strictly after `now`.
    pub fn next_after(&self, now: UnixMs) -> UnixMs {
        let last = self.last_at_or_before(now);
        let zoned = jiff::Timestamp::from_millisecond(last)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_zoned_datetime(self.time_zone.clone());
        let next_day = zoned.date().tomorrow().unwrap_or(zoned.date());
        self.at(next_day).unwrap_or(last + 86_400_000)
    }

    /// The latest reset at or before `now`.
    pub fn last_at_or_before(&self, now: UnixMs) -> UnixMs {
        let zoned = jiff::Timestamp::from_millisecond(now)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_zoned_datetime(self.time_zone.clone());
        let today = zoned.date();
        match self.at(today) {
            Some(t) if t <= now => t,
            _ => today
                .yesterday()
                .ok()
                .and_then(|d| self.at(d))
                .unwrap_or(now - 86_400_000),
        }
    }

    fn at(&self, date: jiff::civil::Date) -> Option<UnixMs> {
        let zoned = date
            .at(self.hour, self.minute, 0, 0)
            .to_zoned_datetime(self.time_zone.clone())
            .ok()?;
        Some(zoned.timestamp().as_millisecond())
    }

    pub fn parse(time: &str, zone: &str) -> Result<Self, String> {
        let (h, m) = time
            .split_once(':')
            .and_then(|(h, m)| Some((h.trim().parse::<i8>().ok()?, m.trim().parse::<i8>().ok()?)))
            .filter(|(h, m)| (0..24).contains(h) && (0..60).contains(m))
            .ok_or_else(|| {
                format!("daily_reset.time {time:?} is not a time of day such as \"03:00\"")
            })?;
        let time_zone = if zone.eq_ignore_ascii_case("utc") {
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::get(zone).map_err(|_| {
                format!("daily_reset.time_zone {zone:?} is not a known IANA time zone such as \"Europe/Paris\"")
            })?
        };
        Ok(Self {
            hour: h,
            minute: m,
            time_zone,
        })
    }
}
