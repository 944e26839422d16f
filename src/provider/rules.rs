//! A provider file's `errors:` and `retry_after:` sections, checked into the [`Classifier`] that judges its
//! failures. Every problem is reported with the path of the field that has it (`errors[2].body_regex`).

use super::schema::{RawRetrySource, RawRule, RawStatus};
use super::{Classifier, ErrorRule, RetryAfterSource, StatusMatch};
use http::header::HeaderName;

/// Reports a problem: what is wrong, and a hint (empty: none).
pub(super) type Problems<'a> = &'a mut dyn FnMut(String, &str);

/// The classifier of a provider file: its rules in order, and where its upstream states a wait (the defaults
/// when the file does not say).
pub(super) fn classifier(
    retry_after: Option<Vec<RawRetrySource>>,
    errors: Vec<RawRule>,
    err: Problems<'_>,
) -> Classifier {
    let retry_after = match retry_after {
        Some(list) => retry_sources(list, "retry_after", err),
        None => Classifier::default_retry_after(),
    };
    let rules = errors
        .into_iter()
        .enumerate()
        .map(|(i, rule)| error_rule(i, rule, err))
        .collect();
    Classifier { rules, retry_after }
}

/// `errors[i]`, checked; a field with a problem is left out of the rule (the file is refused anyway).
fn error_rule(i: usize, r: RawRule, err: Problems<'_>) -> ErrorRule {
    let status = r.status.and_then(|status| match status {
        RawStatus::One(code) => Some(StatusMatch::Codes(vec![code])),
        RawStatus::Many(codes) => Some(StatusMatch::Codes(codes)),
        RawStatus::Pattern(p) => match p.to_ascii_lowercase().as_str() {
            "4xx" => Some(StatusMatch::Hundreds(4)),
            "5xx" => Some(StatusMatch::Hundreds(5)),
            _ => {
                err(
                    format!("errors[{i}].status {p:?} must be a code, a list of codes, 4xx or 5xx"),
                    "",
                );
                None
            }
        },
    });
    let body_regex = r.body_regex.and_then(|re| {
        regex_lite::Regex::new(&re)
            .map_err(|e| {
                err(
                    format!("errors[{i}].body_regex is not a valid regex: {e}"),
                    "",
                )
            })
            .ok()
    });
    let header = r.header.and_then(|h| {
        HeaderName::try_from(h.as_str())
            .map_err(|_| {
                err(
                    format!("errors[{i}].header {h:?} is not a valid header name"),
                    "",
                )
            })
            .ok()
    });
    let retry_after = r
        .retry_after
        .map(|list| retry_sources(list, &format!("errors[{i}].retry_after"), err));
    let until = r.cool_until.and_then(|text| {
        let parsed = text
            .split_once(' ')
            .ok_or_else(|| "expected \"HH:MM Zone\"".to_string())
            .and_then(|(time, zone)| crate::config::DailyReset::parse(time.trim(), zone.trim()));
        parsed
            .map_err(|e| {
                err(
                    format!("errors[{i}].cool_until {text:?}: {e}"),
                    "e.g. cool_until: \"00:00 America/Los_Angeles\"",
                )
            })
            .ok()
    });
    ErrorRule {
        status,
        body: r.body.map(|b| b.to_lowercase()),
        body_regex,
        header,
        class: r.class,
        scope: r.scope,
        retry_after,
        until,
    }
}

/// A list of places a wait is stated (`at` names it in messages): each a header, or a regex over the body
/// whose first capture group is the wait.
fn retry_sources(raw: Vec<RawRetrySource>, at: &str, err: Problems<'_>) -> Vec<RetryAfterSource> {
    raw.into_iter()
        .enumerate()
        .filter_map(|(i, s)| match (s.header, s.body) {
            (Some(h), None) => match HeaderName::try_from(h.as_str()) {
                Ok(h) => Some(RetryAfterSource::Header(h)),
                Err(_) => {
                    err(
                        format!("{at}[{i}].header {h:?} is not a valid header name"),
                        "",
                    );
                    None
                }
            },
            (None, Some(re)) => match regex_lite::Regex::new(&re) {
                Ok(re) if re.captures_len() > 1 => Some(RetryAfterSource::Body(re)),
                Ok(_) => {
                    err(
                        format!("{at}[{i}].body needs a capture group around the value"),
                        "e.g. '\"retryDelay\"\\s*:\\s*\"([^\"]+)\"'",
                    );
                    None
                }
                Err(e) => {
                    err(format!("{at}[{i}].body is not a valid regex: {e}"), "");
                    None
                }
            },
            _ => {
                err(
                    format!("{at}[{i}] must have exactly one of header or body"),
                    "",
                );
                None
            }
        })
        .collect()
}
