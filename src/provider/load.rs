//! Reading a provider file: parsing, checking every field with a message that names the file and line, and
//! resolving it (with `<NAME>_API_BASE` and `config.yaml`'s overrides applied by the snapshot) into a
//! [`Provider`].

use super::rules::Problems;
use super::schema::*;
use super::{Auth, ListSource, Paths, Prices, Provider};
use crate::config::{ConfigError, Tuning, TuningPatch, parse_yaml};
use crate::glob::ModelFilter;
use http::header::{HeaderName, HeaderValue};
use std::path::Path;

/// A provider's base URL, checked: an absolute `http://` or `https://` URL without credentials, its trailing `/`
/// dropped. The error (what is wrong, how to fix it) shows the URL without anything that could be a secret.
pub fn base_url(url: &str) -> Result<String, (String, &'static str)> {
    let url = url.trim_end_matches('/');
    let parsed = http::Uri::try_from(url).ok();
    let absolute = parsed.as_ref().is_some_and(|u| u.host().is_some());
    if !(url.starts_with("http://") || url.starts_with("https://")) || !absolute {
        return Err((
            format!(
                "{:?} must be an http:// or https:// URL",
                crate::secret::shown_url(url)
            ),
            "e.g. https://api.example.com/v1",
        ));
    }
    if parsed
        .and_then(|u| u.authority().cloned())
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err((
            "must not carry credentials (user:password@)".into(),
            "put the key in .env and declare how it is sent with auth:",
        ));
    }
    Ok(url.to_string())
}

/// Provider names are file stems: lower-case letters, digits and `_`, so that `<NAME>_API_KEY` is a valid
/// variable name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name.as_bytes()[0].is_ascii_lowercase()
}

/// Reads and validates one provider file. `global` is the tuning from `config.yaml`; `user` the provider's entry
/// under `providers:` there.
pub fn load_file(
    path: &Path,
    plugins: &Path,
    global: &Tuning,
    user: Option<&TuningPatch>,
) -> Result<Provider, Vec<ConfigError>> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    if !valid_name(&name) {
        return Err(vec![
            ConfigError::new(Some(path), format!("{name:?} is not a valid provider name"))
                .hint("name the file with lower-case letters, digits and _, e.g. my_provider.yaml"),
        ]);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![ConfigError::new(Some(path), format!("cannot read: {e}"))])?;
    let mut raw: RawProvider = parse_yaml(path, &text).map_err(|e| vec![e])?;
    let plugin = super::plugin::RawPlugin::take(&mut raw);
    let mut provider = resolve(name, Some(path), raw, global, user)?;
    let fingerprint = crate::config::fingerprint(&text)
        ^ super::plugin::attach(&mut provider, path, plugins, plugin)?;
    provider.fingerprint = fingerprint;
    Ok(provider)
}

/// A provider defined only by `<NAME>_API_BASE`: OpenAI-compatible defaults throughout.
pub fn openai_compatible(name: &str, global: &Tuning, user: Option<&TuningPatch>) -> Provider {
    let mut raw: RawProvider = serde_yaml::from_str(OPENAI_CONVENTIONS)
        .expect("the conventions are a valid provider file");
    raw.base_url = Some("http://unset".into());
    resolve(name.to_string(), None, raw, global, user).expect("defaults are valid")
}

/// What a provider defined only by `<NAME>_API_BASE` follows: OpenAI's conventions, which OpenAI-compatible
/// servers copy. Quota exhaustion (`insufficient_quota`) benches the key until the daily reset instead of
/// passing for a per-minute limit; context-window and content-filter rejections are recognised (so
/// `context_fallbacks` fire); stated waits are read where OpenAI states them; and streams ask for usage
/// (`stream_options.include_usage`), whose chunk only clients that asked for it see. A provider file with the
/// same name replaces all of this.
const OPENAI_CONVENTIONS: &str = r#"
stream_usage: true
retry_after:
  - header: retry-after
  - body: '(?i)try again in ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)'
  - header: x-ratelimit-reset-requests
  - header: x-ratelimit-reset-tokens
errors:
  - status: 429
    body_regex: '(?i)insufficient_quota|exceeded your current quota'
    class: quota
    scope: key
    retry_after: []
  - status: 429
    class: rate_limit
    scope: model
  - status: 400
    body_regex: '(?i)context_length_exceeded|maximum context length|context window|too many tokens'
    class: context_window
  - status: 400
    body_regex: '(?i)content_policy_violation|content_filter|flagged as potentially violating'
    class: content_filter
"#;

fn resolve(
    name: String,
    source: Option<&Path>,
    raw: RawProvider,
    global: &Tuning,
    user: Option<&TuningPatch>,
) -> Result<Provider, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut err = |message: String, hint: &str| {
        let e = ConfigError::new(source, message);
        errors.push(if hint.is_empty() { e } else { e.hint(hint) });
    };

    let base_url = match base_url(raw.base_url.as_deref().unwrap_or_default()) {
        Ok(url) => url,
        Err((why, hint)) => {
            err(format!("base_url {why}"), hint);
            String::new()
        }
    };
    let auth = auth(raw.auth, &mut err);
    let headers = headers(raw.headers, &mut err);
    let (paths, list) = paths(raw.paths, &raw.models, &mut err);
    let classifier = super::rules::classifier(raw.retry_after, raw.errors, &mut err);
    let file_tuning = TuningPatch {
        selection: raw.selection,
        concurrency: raw.concurrency,
        cooldowns: raw.cooldowns,
        retries: raw.retries,
        timeouts: raw.timeouts,
        limits: raw.limits,
        scripts: raw.scripts,
    };
    let tuning = tuning(file_tuning, global, user, &mut err);
    let dialects: Vec<(
        crate::mapping::inbound::Dialect,
        crate::mapping::inbound::DialectRoute,
    )> = raw
        .dialects
        .into_iter()
        .map(|(d, r)| (d, r.into()))
        .collect();
    for (dialect, route) in dialects.iter().filter(|(_, r)| !r.path.starts_with('/')) {
        err(
            format!(
                "dialects: {}: the path {:?} must start with /",
                dialect.name(),
                route.path
            ),
            "e.g. messages: /messages (relative to base_url)",
        );
    }
    for alias in raw.aliases.iter().filter(|a| !valid_name(a)) {
        err(
            format!("aliases: {alias:?} is not a valid provider name"),
            "lower-case letters, digits and _, e.g. together_ai",
        );
    }

    let prices = match Prices::resolve(raw.prices.unwrap_or_default()) {
        Ok(prices) => prices,
        Err(problems) => {
            for problem in problems {
                err(problem, "");
            }
            Prices::default()
        }
    };

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Provider {
        name,
        source: source.map(Path::to_path_buf),
        base_url,
        auth,
        headers,
        paths,
        list,
        static_models: raw.models.static_list,
        filter: ModelFilter {
            allow: raw.models.allow,
            deny: raw.models.deny,
            allow_wins: false,
        },
        stream_usage: raw.stream_usage,
        aliases: raw.aliases,
        prices,
        dialects,
        renames: raw.renames.into_iter().collect(),
        classifier,
        tuning,
        keys: Vec::new(),
        script: None,
        mapping: crate::mapping::Mapping::default(),
        continuation: raw.continuation.map(|c| c.assistant),
        fingerprint: 0,
    })
}

/// `auth:`, checked: a query parameter, or a header whose value template contains `{key}`.
fn auth(raw: RawAuth, err: Problems<'_>) -> Auth {
    match (raw.query, raw.header, raw.value) {
        (Some(param), None, None) => Auth::Query { param },
        (Some(_), _, _) => {
            err(
                "auth: use either query or header/value, not both".into(),
                "",
            );
            Auth::Query {
                param: "key".into(),
            }
        }
        (None, header, value) => {
            let header = header.unwrap_or_else(|| "Authorization".into());
            let value = value.unwrap_or_else(|| "Bearer {key}".into());
            let name = HeaderName::try_from(header.as_str()).unwrap_or_else(|_| {
                err(
                    format!("auth.header {header:?} is not a valid header name"),
                    "",
                );
                HeaderName::from_static("authorization")
            });
            match value.split_once("{key}") {
                Some((prefix, suffix)) => Auth::Header {
                    name,
                    prefix: prefix.to_string(),
                    suffix: suffix.to_string(),
                },
                None => {
                    err(
                        format!("auth.value {value:?} must contain {{key}}"),
                        "e.g. value: \"Bearer {key}\"",
                    );
                    Auth::Header {
                        name,
                        prefix: String::new(),
                        suffix: String::new(),
                    }
                }
            }
        }
    }
}

/// `headers:`, checked.
fn headers(
    raw: std::collections::BTreeMap<String, String>,
    err: Problems<'_>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    for (k, v) in raw {
        match (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            (Ok(k), Ok(v)) => headers.push((k, v)),
            _ => err(format!("headers: {k:?} is not a valid header"), ""),
        }
    }

    headers
}

/// `paths:` with their defaults, and where the model list comes from.
fn paths(raw: RawPaths, models: &RawModels, err: Problems<'_>) -> (Paths, ListSource) {
    let path_or = |p: Option<Option<String>>, default: &str| -> Option<String> {
        p.unwrap_or_else(|| Some(default.to_string())).map(|p| {
            if p.starts_with('/') {
                p
            } else {
                format!("/{p}")
            }
        })
    };
    let paths = Paths {
        chat: path_or(raw.chat, "/chat/completions"),
        embeddings: path_or(raw.embeddings, "/embeddings"),
        models: path_or(raw.models, "/models"),
    };
    let list = models.list.unwrap_or(if paths.models.is_some() {
        if models.static_list.is_empty() {
            ListSource::Upstream
        } else {
            ListSource::Both
        }
    } else {
        ListSource::Static
    });
    if list != ListSource::Static && paths.models.is_none() {
        err(
            "models.list asks for the upstream list but paths.models is null".into(),
            "set paths.models or use list: static",
        );
    }

    (paths, list)
}

/// The provider's tuning: the global one, patched by the file, then by `config.yaml`'s entry for it.
fn tuning(
    file: TuningPatch,
    global: &Tuning,
    user: Option<&TuningPatch>,
    err: Problems<'_>,
) -> Tuning {
    let mut tuning = global.patched(&file);
    if let Some(user) = user {
        tuning = tuning.patched(user);
    }
    for problem in tuning.problems() {
        err(problem, "");
    }
    tuning
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::ErrorClass;
    use std::io::Write;

    fn load(text: &str) -> Result<Provider, Vec<ConfigError>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acme.yaml");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        load_file(&path, dir.path(), &Tuning::default(), None)
    }

    #[test]
    fn minimal_file_gets_openai_defaults() {
        let p = load("base_url: https://api.acme.test/v1/\n").unwrap();
        assert_eq!(p.name, "acme");
        assert_eq!(
            p.url(p.paths.chat.as_deref().unwrap()),
            "https://api.acme.test/v1/chat/completions"
        );
        assert_eq!(p.list, ListSource::Upstream);
        assert!(
            matches!(&p.auth, Auth::Header { name, prefix, .. } if name == "authorization" && prefix == "Bearer ")
        );
        assert_eq!(p.classifier.retry_after.len(), 2);
    }

    #[test]
    fn full_file() {
        let p = load(
            r#"
base_url: https://api.acme.test
auth: { header: x-api-key, value: "{key}" }
headers: { acme-version: "2024-01-01" }
paths: { embeddings: null, models: v2/models }
models: { list: both, static: [m1], deny: ["*-old"] }
stream_usage: true
errors:
  - status: 429
    body: Insufficient_Quota
    class: quota
  - status: 5xx
    body_regex: "overload(ed)?"
    class: rate_limit
    retry_after: [{ body: 'wait (\d+)s' }]
concurrency: { per_key_model: 3 }
"#,
        )
        .unwrap();
        assert_eq!(p.paths.embeddings, None);
        assert_eq!(p.paths.models.as_deref(), Some("/v2/models"));
        assert_eq!(p.classifier.rules.len(), 2);
        assert_eq!(
            p.classifier.rules[0].body.as_deref(),
            Some("insufficient_quota")
        );
        assert_eq!(p.tuning.per_key_model, 3);
        assert!(!p.filter.permits("m-old"));
        let v = p
            .classifier
            .classify(503, &Default::default(), "overloaded, wait 12s", 0);
        assert_eq!(v.class, ErrorClass::RateLimit);
        assert_eq!(v.retry_after, Some(std::time::Duration::from_secs(12)));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let errors = load("base_url: https://user:s3cret@api.acme.test/v1\n").unwrap_err();
        let text = errors.iter().map(|e| e.to_string()).collect::<String>();
        assert!(
            text.contains("must not carry credentials") && !text.contains("s3cret"),
            "{text}"
        );
        let errors = load("base_url: https://x\nmodles: {}\n").unwrap_err();
        assert_eq!(errors[0].line, Some(2));
        assert!(errors[0].message.contains("unknown field `modles`"));
        let errors = load(
            "base_url: ftp://x\nauth: {value: Bearer}\nerrors: [{status: 6xx, class: server}]\n",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        let errors =
            load("base_url: https://x\nerrors: [{status: 400, class: teapot}]\n").unwrap_err();
        assert!(
            errors[0].message.contains("unknown variant `teapot`"),
            "{errors:?}"
        );
    }
}
