//! Human durations ("250ms", "30s", "1m30s", "6m0s", "1.5h") used by configuration files and by upstreams that
//! state how long to wait.

use std::time::Duration;

/// Parses a duration made of one or more `<number><unit>` parts (units `ms`, `s`, `m`, `h`, `d`), or a bare
/// number of seconds. Fractions are allowed (`1.5s`). Returns `None` for anything else, including negatives.
pub fn parse(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(secs) = text.parse::<f64>() {
        return seconds(secs);
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match rest[..unit_len].trim() {
            "ms" => 0.001,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    seconds(total)
}

fn seconds(secs: f64) -> Option<Duration> {
    (secs.is_finite() && (0.0..1e12).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

/// Serde adapter: a duration written as a string (`"30s"`) or a number of seconds.
pub mod serde_human {
    use serde::{Deserialize, Deserializer, de::Error};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let parsed = match Raw::deserialize(d)? {
            Raw::Secs(secs) => super::seconds(secs),
            Raw::Text(text) => super::parse(&text),
        };
        parsed.ok_or_else(|| D::Error::custom("expected a duration such as 30s, 250ms, 5m or 1h"))
    }

    pub mod option {
        use serde::{Deserialize, Deserializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Duration);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }

    pub mod list {
        use serde::{Deserialize, Deserializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<Duration>>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Duration);
            Ok(Option::<Vec<Wrap>>::deserialize(d)?.map(|v| v.into_iter().map(|w| w.0).collect()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::time::Duration;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse(" 1h "), Some(Duration::from_secs(3600)));
        assert_eq!(parse("0.5"), Some(Duration::from_millis(500)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "10x", "-1", "abc", "1m-2s", "NaN"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
