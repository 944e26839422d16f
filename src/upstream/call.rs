//! One upstream HTTP call as a mapping decides it, before a key is added.

use http::header::{HeaderName, HeaderValue};

/// One upstream HTTP call, before a key is added: what the request hook (or passthrough) decided.
#[derive(Clone, Debug)]
pub struct UpstreamCall {
    pub method: http::Method,
    /// Relative to the base URL.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: bytes::Bytes,
}

impl UpstreamCall {
    pub fn get(path: &str) -> Self {
        Self {
            method: http::Method::GET,
            path: path.to_string(),
            query: Vec::new(),
            headers: Vec::new(),
            body: bytes::Bytes::new(),
        }
    }

    pub fn post_json(path: &str, body: bytes::Bytes) -> Self {
        Self {
            method: http::Method::POST,
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
            ..Self::get(path)
        }
    }
}
