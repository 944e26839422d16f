//! Turning an upstream failure into an [`ErrorClass`]: the provider's declared rules first, then built-in defaults
//! by status; and finding how long the upstream asked us to wait.

use crate::clock::UnixMs;
use crate::failure::{ErrorClass, Scope};
use http::header::{HeaderMap, HeaderName};
use std::time::Duration;

/// Which HTTP statuses a rule covers.
#[derive(Clone, Debug)]
pub enum StatusMatch {
    Codes(Vec<u16>),
    /// `4xx` -> 4, `5xx` -> 5.
    Hundreds(u16),
}

impl StatusMatch {
    fn covers(&self, status: u16) -> bool {
        match self {
            Self::Codes(codes) => codes.contains(&status),
            Self::Hundreds(h) => status / 100 == *h,
        }
    }
}

/// Where an upstream states how long to wait.
#[derive(Clone, Debug)]
pub enum RetryAfterSource {
    Header(HeaderName),
    /// The first capture group of a regex over the body.
    Body(regex_lite::Regex),
}

/// One declared classification rule; every condition present must hold.
#[derive(Clone, Debug)]
pub struct ErrorRule {
    pub status: Option<StatusMatch>,
    /// Lower-cased substring of the body.
    pub body: Option<String>,
    pub body_regex: Option<regex_lite::Regex>,
    pub header: Option<HeaderName>,
    pub class: ErrorClass,
    pub scope: Option<Scope>,
    pub retry_after: Option<Vec<RetryAfterSource>>,
    /// Cool until the next occurrence of this time of day, whatever the upstream states.
    pub until: Option<crate::config::DailyReset>,
}

/// An upstream failure after classification.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub class: ErrorClass,
    pub scope: Scope,
    /// How long the upstream asked us to wait, when it said so.
    pub retry_after: Option<Duration>,
}

impl Verdict {
    /// A verdict for this key and model, with no stated wait.
    pub fn model(class: ErrorClass) -> Self {
        Self {
            class,
            scope: Scope::Model,
            retry_after: None,
        }
    }
}

/// The rules of one provider.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    pub rules: Vec<ErrorRule>,
    pub retry_after: Vec<RetryAfterSource>,
}

impl Classifier {
    /// The sources used when a provider declares none.
    pub fn default_retry_after() -> Vec<RetryAfterSource> {
        vec![
            RetryAfterSource::Header(HeaderName::from_static("retry-after")),
            RetryAfterSource::Header(HeaderName::from_static("x-ratelimit-reset")),
        ]
    }

    pub fn classify(&self, status: u16, headers: &HeaderMap, body: &str, now: UnixMs) -> Verdict {
        let lowered = body.to_lowercase();
        let rule = self.rules.iter().find(|rule| {
            rule.status.as_ref().is_none_or(|s| s.covers(status))
                && rule
                    .body
                    .as_ref()
                    .is_none_or(|needle| lowered.contains(needle.as_str()))
                && rule.body_regex.as_ref().is_none_or(|re| re.is_match(body))
                && rule.header.as_ref().is_none_or(|h| headers.contains_key(h))
        });
        let class = rule.map_or_else(|| default_class(status), |r| r.class);
        let scope = rule.and_then(|r| r.scope).unwrap_or_else(|| {
            // A refusal that is about the model ("not allowed to sample from this model", "this key may not use
            // model x") says nothing about the key's other models.
            if matches!(class, ErrorClass::Auth | ErrorClass::Forbidden)
                && lowered.contains("model")
            {
                Scope::Model
            } else {
                class.default_scope()
            }
        });
        let sources = rule
            .and_then(|r| r.retry_after.as_deref())
            .unwrap_or(&self.retry_after);
        if let Some(reset) = rule.and_then(|r| r.until.as_ref()) {
            let wait = (reset.next_after(now) - now).max(0) as u64;
            return Verdict {
                class,
                scope,
                retry_after: Some(Duration::from_millis(wait)),
            };
        }
        let retry_after = sources.iter().find_map(|source| match source {
            RetryAfterSource::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| stated_wait(v, now)),
            RetryAfterSource::Body(re) => re
                .captures(body)
                .and_then(|c| c.get(1))
                .and_then(|m| stated_wait(m.as_str(), now)),
        });
        Verdict {
            class,
            scope,
            retry_after,
        }
    }
}

/// The class of a status that no declared rule covers.
pub fn default_class(status: u16) -> ErrorClass {
    match status {
        401 => ErrorClass::Auth,
        402 => ErrorClass::Quota,
        403 => ErrorClass::Forbidden,
        408 => ErrorClass::Timeout,
        429 => ErrorClass::RateLimit,
        400..=499 => ErrorClass::InvalidRequest,
        _ => ErrorClass::Server,
    }
}

/// A stated wait shorter than this (a time in the past, `0`, a few milliseconds) is taken as no stated wait: the
/// escalating schedule applies instead, so that an upstream that keeps saying "retry now" is not hammered.
pub const MIN_STATED_WAIT: Duration = Duration::from_secs(1);

/// A wait an upstream states ([`parse_wait`]), when it is long enough to mean something ([`MIN_STATED_WAIT`]).
pub fn stated_wait(value: &str, now: UnixMs) -> Option<Duration> {
    parse_wait(value, now).filter(|wait| *wait >= MIN_STATED_WAIT)
}

/// Reads a wait stated by an upstream: seconds (`"2"`, `"1.5"`), a duration (`"6m0s"`, `"20ms"`), an HTTP date,
/// or a Unix timestamp in seconds or milliseconds. Returns the wait from `now`; a time in the past is no wait.
pub fn parse_wait(value: &str, now: UnixMs) -> Option<Duration> {
    let value = value.trim().trim_matches('"');
    let until_ms = |at: i64| Some(Duration::from_millis((at - now).max(0) as u64));
    if let Ok(number) = value.parse::<f64>() {
        if !number.is_finite() || number < 0.0 {
            return None;
        }
        return if number >= 1e12 {
            until_ms(number as i64)
        } else if number >= 1e9 {
            until_ms((number * 1000.0) as i64)
        } else {
            Some(Duration::from_secs_f64(number))
        };
    }
    if let Some(d) = crate::duration::parse(value) {
        return Some(d);
    }
    let stamp = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(value)
        .ok()?;
    until_ms(stamp.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    const NOW: UnixMs = 1_760_000_000_000;

    #[test]
    fn waits_in_every_form() {
        assert_eq!(parse_wait("2", NOW), Some(Duration::from_secs(2)));
        assert_eq!(parse_wait("6m0s", NOW), Some(Duration::from_secs(360)));
        assert_eq!(parse_wait("\"17s\"", NOW), Some(Duration::from_secs(17)));
        assert_eq!(parse_wait("1760000005", NOW), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_wait("1760000000250", NOW),
            Some(Duration::from_millis(250))
        );
        // 2025-10-09T08:53:30Z is 10 s after NOW.
        assert_eq!(
            parse_wait("Thu, 09 Oct 2025 08:53:30 GMT", NOW),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_wait("Thu, 01 Jan 2015 00:00:00 GMT", NOW),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_wait("soon", NOW), None);
    }

    #[test]
    fn rules_then_defaults() {
        let classifier = Classifier {
            rules: vec![ErrorRule {
                status: Some(StatusMatch::Codes(vec![429])),
                body: Some("insufficient_quota".into()),
                body_regex: None,
                header: None,
                class: ErrorClass::Quota,
                scope: None,
                retry_after: None,
                until: None,
            }],
            retry_after: Classifier::default_retry_after(),
        };
        let mut headers = HeaderMap::new();
        let quota = classifier.classify(
            429,
            &headers,
            r#"{"error":{"code":"INSUFFICIENT_QUOTA"}}"#,
            NOW,
        );
        assert_eq!(quota.class, ErrorClass::Quota);
        headers.insert("retry-after", HeaderValue::from_static("7"));
        let limited = classifier.classify(429, &headers, "slow down", NOW);
        assert_eq!(
            limited,
            Verdict {
                class: ErrorClass::RateLimit,
                scope: Scope::Model,
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let auth = classifier.classify(401, &HeaderMap::new(), "", NOW);
        assert_eq!((auth.class, auth.scope), (ErrorClass::Auth, Scope::Key));
        let model = classifier.classify(
            403,
            &HeaderMap::new(),
            "not allowed to sample from this Model",
            NOW,
        );
        assert_eq!(
            (model.class, model.scope),
            (ErrorClass::Forbidden, Scope::Model)
        );
        headers.insert("retry-after", HeaderValue::from_static("0"));
        assert_eq!(
            classifier.classify(429, &headers, "", NOW).retry_after,
            None
        );
        headers.insert(
            "retry-after",
            HeaderValue::from_static("Thu, 01 Jan 2015 00:00:00 GMT"),
        );
        assert_eq!(
            classifier.classify(429, &headers, "", NOW).retry_after,
            None
        );
        assert_eq!(
            classifier.classify(503, &HeaderMap::new(), "", NOW).class,
            ErrorClass::Server
        );
        assert_eq!(
            classifier.classify(422, &HeaderMap::new(), "", NOW).class,
            ErrorClass::InvalidRequest
        );
    }
}
