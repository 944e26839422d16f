//! Upstream URLs: a provider's base and a call's path and query joined, encoded and parsed once; a model name
//! as one path segment; a URL as it may be shown.

/// The upstream URL of a call: `base` (scheme, host, optional path and query) followed by `path`, whose own
/// query, when it has one, replaces the base's; then `pairs`, form-encoded. Characters a URL cannot carry are
/// percent-encoded (a model name goes into some providers' paths).
pub fn upstream_url<'a>(
    base: &str,
    path: &str,
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<reqwest::Url, String> {
    let (base, base_query) = base.split_once('?').unwrap_or((base, ""));
    let (path, query) = path.split_once('?').unwrap_or((path, base_query));
    let mut out = String::with_capacity(base.len() + path.len() + query.len() + 64);
    out.push_str(base.trim_end_matches('/'));
    encode_into(&mut out, path, b"/");
    let mut joiner = '?';
    if !query.is_empty() {
        out.push('?');
        encode_into(&mut out, query, b"/?");
        joiner = '&';
    }
    for (k, v) in pairs {
        out.push(joiner);
        out.extend(form_urlencoded::byte_serialize(k.as_bytes()));
        out.push('=');
        out.extend(form_urlencoded::byte_serialize(v.as_bytes()));
        joiner = '&';
    }
    // Parsed once, as the client sends it (a URL parse per request is a measurable share of the proxy's work:
    // about 6,000 instructions for a short one), and only when it differs from the last one this thread parsed:
    // a worker mostly sends the same provider's same endpoint again.
    thread_local! {
        static LAST: std::cell::RefCell<Option<(String, reqwest::Url)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((_, url)) = last.as_ref().filter(|(text, _)| *text == out) {
            return Ok(url.clone());
        }
        let url = reqwest::Url::parse(&out)
            .map_err(|_| format!("invalid upstream URL for the path {path:?}"))?;
        *last = Some((out, url.clone()));
        Ok(url)
    })
}

/// `text` as one path segment: every byte but unreserved characters, sub-delimiters, `:` and `@` percent-encoded
/// (`/`, `?`, `#` and `%` included), and `.` and `..` written `%2E` and `%2E%2E`.
pub fn path_segment(text: &str) -> std::borrow::Cow<'_, str> {
    const SAFE: &[u8] = b"-._~!$&'()*+,;=:@";
    if text == "." || text == ".." {
        return text.replace('.', "%2E").into();
    }
    if text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || SAFE.contains(&b))
    {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || SAFE.contains(&b) {
            out.push(char::from(b));
        } else {
            push_escaped(&mut out, b);
        }
    }
    out.into()
}

fn push_escaped(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 15)]));
}

/// Appends `text`, percent-encoding every byte that is not an RFC 3986 `pchar`, `%` or one of `also`.
fn encode_into(out: &mut String, text: &str, also: &[u8]) {
    const SAFE: &[u8] = b"-._~!$&'()*+,;=:@%";
    let safe = |b: u8| b.is_ascii_alphanumeric() || SAFE.contains(&b) || also.contains(&b);
    if text.bytes().all(safe) {
        out.push_str(text);
        return;
    }
    for b in text.bytes() {
        if safe(b) {
            out.push(char::from(b));
        } else {
            push_escaped(out, b);
        }
    }
}

/// A URL without its user info and query, which could carry credentials; empty when it is not a URL.
pub fn public_url(url: &str) -> String {
    let Ok(uri) = http::Uri::try_from(url) else {
        return String::new();
    };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return String::new();
    };
    let host = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, h)| h);
    format!("{scheme}://{host}{}", uri.path().trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(base: &str, path: &str, pairs: &[(&str, &str)]) -> String {
        upstream_url(base, path, pairs.iter().copied())
            .unwrap()
            .to_string()
    }

    #[test]
    fn joins_base_and_path() {
        assert_eq!(
            uri("https://api.acme.test/v1", "/chat/completions", &[]),
            "https://api.acme.test/v1/chat/completions"
        );
        assert_eq!(
            uri("http://127.0.0.1:9000", "/v1/models", &[]),
            "http://127.0.0.1:9000/v1/models"
        );
    }

    #[test]
    fn queries_of_base_path_and_pairs() {
        assert_eq!(
            uri("https://h/v1?api-version=2", "/chat", &[("key", "a b&c")]),
            "https://h/v1/chat?api-version=2&key=a+b%26c"
        );
        assert_eq!(
            uri(
                "https://h/v1?api-version=2",
                "/models/m:streamGenerateContent?alt=sse",
                &[("key", "k")]
            ),
            "https://h/v1/models/m:streamGenerateContent?alt=sse&key=k"
        );
    }

    #[test]
    fn a_url_parsed_before_is_the_same_url() {
        let first = uri("http://127.0.0.1:9000/v1", "/chat/completions", &[]);
        let other = uri("https://h/v1?api-version=2", "/chat", &[("key", "k")]);
        assert_eq!(
            uri("http://127.0.0.1:9000/v1", "/chat/completions", &[]),
            first
        );
        assert_eq!(
            uri("https://h/v1?api-version=2", "/chat", &[("key", "k")]),
            other
        );
        assert_eq!(
            uri("https://h/v1?api-version=2", "/chat", &[("key", "k2")]),
            "https://h/v1/chat?api-version=2&key=k2",
            "another key is another URL"
        );
    }

    #[test]
    fn encodes_what_a_url_cannot_carry() {
        assert_eq!(
            uri("https://h", "/models/my model#1/\u{e9}", &[]),
            "https://h/models/my%20model%231/%C3%A9"
        );
        assert_eq!(
            uri("https://h", "/a%2Fb", &[]),
            "https://h/a%2Fb",
            "an encoded path stays as it is"
        );
    }

    #[test]
    fn a_path_segment_cannot_leave_its_segment() {
        assert_eq!(path_segment("gemini-2.5-pro"), "gemini-2.5-pro");
        assert_eq!(
            path_segment("m/../../admin?key=x#y%z"),
            "m%2F..%2F..%2Fadmin%3Fkey=x%23y%25z"
        );
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("a b\u{e9}"), "a%20b%C3%A9");
    }

    #[test]
    fn public_url_drops_credentials() {
        assert_eq!(
            public_url("https://user:pw@api.acme.test/v1/?key=secret"),
            "https://api.acme.test/v1"
        );
        assert_eq!(public_url("not a url"), "");
    }
}
