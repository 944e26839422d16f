//! Everything Rhai: the sandboxed engine, compiled provider scripts and their hooks, and the conversions between
//! JSON and script values. No other module imports `rhai`.
//!
//! A provider file names a script in `plugins/`; the script defines some of these functions (hooks), and a
//! hook it does not define means OpenAI-compatible passthrough:
//!
//! | hook | called with | returns |
//! |---|---|---|
//! | `request(ctx)` | `#{endpoint, model, stream, body, options}` | `#{method, path, query, headers, body}` |
//! | `response(ctx)` | `#{endpoint, model, body, options}` | the OpenAI response object |
//! | `stream_event(event)` | `#{event, data}`, with `this` = per-stream state (a map) | `()`, a chunk part, or an array of them |
//! | `classify(ctx)` | `#{status, headers, body}` | `()` (use the YAML rules) or `#{class, retry_after, scope}` |
//! | `models(body)` | the upstream's model list (parsed JSON) | an array of ids or model objects |
//!
//! Scripts are compiled once per configuration load; only their functions are used (top-level statements never
//! run). Every call is bounded in operations, call depth, and string, array and map sizes.

mod engine;
mod stream;

use crate::config::ConfigError;
use crate::failure::Refused;
use engine::engine;
pub use engine::{Budget, ScriptError};
use rhai::{AST, CallFnOptions, Dynamic, Map, Scope};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
pub use stream::ScriptStream;

/// Why a request was not mapped.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MapError {
    /// Not the script's failure: the request's.
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Script(#[from] ScriptError),
}

/// The hooks a script may define.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Request,
    Response,
    StreamEvent,
    Classify,
    Models,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::Request,
        Hook::Response,
        Hook::StreamEvent,
        Hook::Classify,
        Hook::Models,
    ];

    pub fn fn_name(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::StreamEvent => "stream_event",
            Self::Classify => "classify",
            Self::Models => "models",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.fn_name() == name)
    }
}

/// A provider's compiled script.
#[derive(Debug)]
pub struct ProviderScript {
    /// The file, for messages (`plugins/gemini.rhai`).
    pub file: PathBuf,
    ast: AST,
    hooks: Vec<Hook>,
    /// `options:` from the provider file, passed to hooks as `ctx.options`.
    options: Dynamic,
    /// Script failures since this configuration was loaded.
    errors: AtomicU64,
    /// A hash of the source, so that reloads can tell an edited script.
    pub fingerprint: u64,
    /// Where each function is defined, for errors Rhai cannot place on a line.
    fn_lines: Vec<(String, usize)>,
    /// What each call may spend.
    budget: Budget,
}

/// What the request hook decided: the upstream call, before the key is added.
#[derive(Clone, Debug, PartialEq)]
pub struct MappedRequest {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

/// What the classify hook decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Classified {
    pub class: String,
    /// Seconds, a duration, an HTTP date or a Unix time, as the upstream stated it.
    pub retry_after: Option<String>,
    pub scope: Option<String>,
}

impl ProviderScript {
    /// Compiles `file` and checks that the `wanted` hooks (all defined hooks when `None`) exist with one
    /// parameter each.
    pub fn load(
        file: &Path,
        wanted: Option<&[String]>,
        options: &Value,
        budget: Budget,
    ) -> Result<Self, Vec<ConfigError>> {
        let text = read_bounded(file).map_err(|e| {
            vec![
                ConfigError::new(Some(file), format!("cannot read the script: {e}"))
                    .hint("check the provider's `script:`"),
            ]
        })?;
        let ast = engine().compile(&text).map_err(|e| {
            let mut err = ConfigError::new(Some(file), format!("script does not compile: {}", e.0));
            err.line = e.1.line();
            vec![err]
        })?;
        let defined: Vec<(String, usize)> = ast
            .iter_functions()
            .map(|f| (f.name.to_string(), f.params.len()))
            .collect();
        let mut errors = Vec::new();
        let hooks: Vec<Hook> = match wanted {
            Some(names) => names
                .iter()
                .filter_map(|name| match Hook::parse(name) {
                    Some(hook) if defined.iter().any(|(n, _)| n == hook.fn_name()) => Some(hook),
                    Some(hook) => {
                        errors.push(
                            ConfigError::new(Some(file), format!("the provider uses hook `{name}` but the script defines no `fn {}(…)`", hook.fn_name()))
                                .hint("define it, or remove it from `hooks:`"),
                        );
                        None
                    }
                    None => {
                        errors.push(ConfigError::new(Some(file), format!("unknown hook `{name}`")).hint(
                            "hooks are request, response, stream_event, classify and models",
                        ));
                        None
                    }
                })
                .collect(),
            None => Hook::ALL.into_iter().filter(|h| defined.iter().any(|(n, _)| n == h.fn_name())).collect(),
        };
        for hook in &hooks {
            if let Some((_, arity)) = defined
                .iter()
                .find(|(n, arity)| n == hook.fn_name() && *arity != 1)
            {
                errors.push(ConfigError::new(
                    Some(file),
                    format!(
                        "`fn {}` must take one parameter, not {arity}",
                        hook.fn_name()
                    ),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let options = rhai::serde::to_dynamic(options).unwrap_or(Dynamic::UNIT);
        let fingerprint = crate::config::fingerprint(&text);
        Ok(Self {
            file: file.to_path_buf(),
            ast,
            hooks,
            options,
            errors: AtomicU64::new(0),
            fingerprint,
            fn_lines: engine::function_lines(&text),
            budget,
        })
    }

    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }

    /// Script failures so far.
    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn call(
        &self,
        hook: Hook,
        this: Option<&mut Dynamic>,
        arg: Dynamic,
    ) -> Result<Dynamic, ScriptError> {
        self.run(hook, this, arg).map_err(|e| self.failed(hook, &e))
    }

    /// A hook's failure, counted and logged.
    fn failed(&self, hook: Hook, e: &rhai::EvalAltResult) -> ScriptError {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let err = ScriptError::from_eval(&self.file, hook.fn_name(), e, &self.fn_lines);
        tracing::warn!(error = %err, "provider script failed");
        err
    }

    fn run(
        &self,
        hook: Hook,
        this: Option<&mut Dynamic>,
        arg: Dynamic,
    ) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
        let mut scope = Scope::new();
        let mut options = CallFnOptions::new().eval_ast(false).rewind_scope(false);
        if let Some(this) = this {
            options = options.bind_this_ptr(this);
        }
        engine::within(self.budget, size_of(&arg), || {
            let out = engine().call_fn_with_options::<Dynamic>(
                options,
                &mut scope,
                &self.ast,
                hook.fn_name(),
                (arg,),
            )?;
            // What the hook returns is turned into JSON afterwards: it must fit the budget too.
            match engine::memory_left().checked_sub(size_of(&out)) {
                Some(_) => Ok(out),
                None => Err(Box::new(rhai::EvalAltResult::ErrorTerminated(
                    Dynamic::from(format!(
                        "it returned more than {} MiB (scripts.memory)",
                        self.budget.memory >> 20
                    )),
                    rhai::Position::NONE,
                ))),
            }
        })
    }

    fn ctx(&self, entries: impl IntoIterator<Item = (&'static str, Dynamic)>) -> Dynamic {
        let mut map = Map::new();
        for (k, v) in entries {
            map.insert(k.into(), v);
        }
        map.insert("options".into(), self.options.clone());
        Dynamic::from_map(map)
    }

    /// Runs the request hook on an OpenAI request body.
    pub fn map_request(
        &self,
        endpoint: &str,
        model: &str,
        stream: bool,
        body: &Value,
    ) -> Result<MappedRequest, MapError> {
        let ctx = self.ctx([
            ("endpoint", Dynamic::from(endpoint.to_string())),
            ("model", Dynamic::from(model.to_string())),
            ("stream", Dynamic::from(stream)),
            ("body", to_dynamic(body)),
        ]);
        // A refusal is the request's fault, not the script's: not counted, not logged as a failure.
        let out = self
            .run(Hook::Request, None, ctx)
            .map_err(|e| match engine::refusal(&e) {
                Some(refused) => MapError::Refused(refused),
                None => MapError::Script(self.failed(Hook::Request, &e)),
            })?;
        let fail = |what: &str| self.hook_error(Hook::Request, what);
        let Some(map) = out.try_cast::<Map>() else {
            return Err(fail("must return a map #{path, body, …}").into());
        };
        let text = |key: &str| map.get(key).and_then(|v| v.clone().into_string().ok());
        let pairs = |key: &str| -> Result<Vec<(String, String)>, ScriptError> {
            match map.get(key) {
                None => Ok(Vec::new()),
                Some(v) if v.is_unit() => Ok(Vec::new()),
                Some(v) => match v.clone().try_cast::<Map>() {
                    Some(m) => Ok(m
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()),
                    None => Err(fail(&format!("`{key}` must be a map of strings"))),
                },
            }
        };
        let path = text("path").ok_or_else(|| fail("must return a string `path`"))?;
        Ok(MappedRequest {
            method: text("method")
                .unwrap_or_else(|| "POST".into())
                .to_ascii_uppercase(),
            path: if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            },
            query: pairs("query")?,
            headers: pairs("headers")?,
            body: map.get("body").map(from_dynamic).unwrap_or(Value::Null),
        })
    }

    /// Runs the response hook on an upstream JSON body.
    pub fn map_response(
        &self,
        endpoint: &str,
        model: &str,
        body: &[u8],
    ) -> Result<Value, ScriptError> {
        let parsed = serde_json::from_slice::<Dynamic>(body).map_err(|e| {
            self.hook_error(
                Hook::Response,
                &format!("the upstream body is not JSON: {e}"),
            )
        })?;
        let ctx = self.ctx([
            ("endpoint", Dynamic::from(endpoint.to_string())),
            ("model", Dynamic::from(model.to_string())),
            ("body", parsed),
        ]);
        let out = self.call(Hook::Response, None, ctx)?;
        if !out.is_map() {
            return Err(self.hook_error(Hook::Response, "must return the OpenAI response as a map"));
        }
        Ok(from_dynamic(&out))
    }

    /// Runs the classify hook; `None` means "use the provider's YAML rules".
    pub fn classify(
        &self,
        status: u16,
        headers: &[(String, String)],
        body: &str,
    ) -> Result<Option<Classified>, ScriptError> {
        let header_map: Map = headers
            .iter()
            .map(|(k, v)| (k.as_str().into(), Dynamic::from(v.clone())))
            .collect();
        let parsed = serde_json::from_str::<Dynamic>(body)
            .unwrap_or_else(|_| Dynamic::from(body.to_string()));
        let ctx = self.ctx([
            ("status", Dynamic::from(status as i64)),
            ("headers", Dynamic::from_map(header_map)),
            ("body", parsed),
        ]);
        let out = self.call(Hook::Classify, None, ctx)?;
        if out.is_unit() {
            return Ok(None);
        }
        let Some(map) = out.try_cast::<Map>() else {
            return Err(self.hook_error(
                Hook::Classify,
                "must return () or #{class, retry_after, scope}",
            ));
        };
        let text = |key: &str| map.get(key).filter(|v| !v.is_unit()).map(|v| v.to_string());
        let class = text("class")
            .ok_or_else(|| self.hook_error(Hook::Classify, "must return a `class`"))?;
        Ok(Some(Classified {
            class,
            retry_after: text("retry_after"),
            scope: text("scope"),
        }))
    }

    /// Runs the models hook on the upstream's list; returns OpenAI-style model objects (at least an `id`).
    pub fn map_models(&self, body: &[u8]) -> Result<Vec<Value>, ScriptError> {
        let parsed = serde_json::from_slice::<Dynamic>(body).map_err(|e| {
            self.hook_error(Hook::Models, &format!("the model list is not JSON: {e}"))
        })?;
        let out = self.call(Hook::Models, None, parsed)?;
        let Some(items) = out.try_cast::<rhai::Array>() else {
            return Err(
                self.hook_error(Hook::Models, "must return an array of ids or #{id, …} maps")
            );
        };
        Ok(items
            .iter()
            .map(from_dynamic)
            .filter_map(|v| match v {
                Value::String(id) => Some(serde_json::json!({"id": id})),
                Value::Object(m) if m.get("id").is_some_and(Value::is_string) => {
                    Some(Value::Object(m))
                }
                _ => None,
            })
            .collect())
    }

    /// The script side of a new stream, with empty state.
    pub fn stream(self: &std::sync::Arc<Self>) -> ScriptStream {
        ScriptStream::new(self.clone())
    }

    pub fn hook_error(&self, hook: Hook, what: &str) -> ScriptError {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let line = self
            .fn_lines
            .iter()
            .find(|(n, _)| n == hook.fn_name())
            .map(|(_, l)| *l);
        ScriptError {
            file: self.file.clone(),
            function: hook.fn_name().into(),
            line,
            line_is_definition: line.is_some(),
            message: what.into(),
        }
    }
}

/// About how many bytes `value` takes once turned into JSON (a string shared several times counts each time).
fn size_of(value: &Dynamic) -> usize {
    if let Some(map) = value.read_lock::<Map>() {
        map.iter()
            .map(|(k, v)| k.len() + 8 + size_of(v))
            .fold(2, usize::saturating_add)
    } else if let Some(array) = value.read_lock::<rhai::Array>() {
        array
            .iter()
            .map(|v| 1 + size_of(v))
            .fold(2, usize::saturating_add)
    } else if let Some(text) = value.read_lock::<rhai::ImmutableString>() {
        text.len() + 2
    } else {
        16
    }
}

/// The largest script read.
const MAX_SCRIPT: u64 = 4 << 20;

/// A script's text, refused past [`MAX_SCRIPT`] bytes.
fn read_bounded(file: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(file)?
        .take(MAX_SCRIPT + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SCRIPT {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_SCRIPT >> 20
        )));
    }
    Ok(text)
}

/// JSON to a script value.
pub fn to_dynamic(value: &Value) -> Dynamic {
    rhai::serde::to_dynamic(value).unwrap_or(Dynamic::UNIT)
}

/// A script value to JSON (`()` is `null`).
pub fn from_dynamic(value: &Dynamic) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}
