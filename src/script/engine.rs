//! The one sandboxed Rhai engine shared by every script, and the helpers scripts may call.
//!
//! Scripts cannot reach files, the network, the environment or other modules (imports resolve nothing), cannot
//! `eval`, and every call is bounded. `print` and `debug` go to the log.

use crate::failure::Refused;
use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, Map};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Operations one hook call may perform on a small input: an endless loop stops here, in about a millisecond.
pub const BASE_OPERATIONS: u64 = 500_000;
/// Operations allowed besides per byte of the call's input: a long conversation is mapped whole.
pub const OPERATIONS_PER_BYTE: u64 = 8;
/// The longest string one operation may build (`json_stringify`, `to_string` of a map or array), within the
/// call's memory budget. Bodies up to the request size limit must fit (base64 images).
pub const MAX_STRING: usize = 64 << 20;
pub const MAX_CALL_LEVELS: usize = 48;

/// What one call may spend (`scripts:` in `config.yaml` or a provider file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Bytes the call may build (strings, arrays, maps, variables: everything it allocates and keeps).
    pub memory: usize,
    /// Wall time.
    pub time: Duration,
}

impl Budget {
    pub fn of(tuning: &crate::config::Tuning) -> Self {
        Self {
            memory: tuning.script_memory,
            time: tuning.script_time,
        }
    }
}

/// The budget of the call running on this thread.
#[derive(Clone, Copy)]
struct Spending {
    budget: Budget,
    /// The lowest this thread's allocation count has been since the call began: what the call holds is the
    /// count above it (memory it frees that it was handed, its input, does not make room for more).
    low: isize,
    until: Instant,
    /// Operations it may perform.
    operations: u64,
}

thread_local! {
    static SPENDING: Cell<Option<Spending>> = const { Cell::new(None) };
}

/// Runs `call` (one script call, on an input of `input` bytes) on this thread within `budget` and an operation
/// allowance that grows with its input: past either, the script stops at its next operation with an error
/// saying which limit it reached.
pub fn within<T>(budget: Budget, input: usize, call: impl FnOnce() -> T) -> T {
    let spending = Spending {
        budget,
        low: crate::alloc::thread_net(),
        until: Instant::now() + budget.time,
        operations: BASE_OPERATIONS
            .saturating_add(OPERATIONS_PER_BYTE.saturating_mul(input as u64)),
    };
    let outer = SPENDING.with(|s| s.replace(Some(spending)));
    let out = call();
    SPENDING.with(|s| s.set(outer));
    out
}

/// Bytes the running call may still build; unbounded outside a call.
pub fn memory_left() -> usize {
    SPENDING.with(|cell| {
        let Some(mut s) = cell.get() else {
            return usize::MAX;
        };
        let now = crate::alloc::thread_net();
        if now < s.low {
            s.low = now;
            cell.set(Some(s));
        }
        let used = (now - s.low) as usize;
        s.budget.memory.saturating_sub(used)
    })
}

/// Why the running call must stop, if it must.
fn overspent(operations: u64) -> Option<String> {
    let s = SPENDING.with(Cell::get)?;
    if memory_left() == 0 {
        return Some(format!(
            "it built more than {} MiB (scripts.memory)",
            s.budget.memory >> 20
        ));
    }
    if operations > s.operations {
        return Some(format!(
            "it reached its operation limit ({} operations for its input)",
            s.operations
        ));
    }
    // Reading the clock costs more than the rest of this check: every 64 operations is often enough.
    if operations.is_multiple_of(64) && Instant::now() >= s.until {
        return Some(format!(
            "it ran longer than {:?} (scripts.time)",
            s.budget.time
        ));
    }
    None
}

pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(build)
}

fn build() -> Engine {
    let mut e = Engine::new();
    e.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    e.disable_symbol("eval");
    e.set_strict_variables(true);
    e.set_max_call_levels(MAX_CALL_LEVELS);
    e.set_max_expr_depths(64, 64);
    // No size limits of Rhai's own: it checks them by walking a value whole after each operation, which made a
    // long conversation (one array of many maps) quadratic, and counted the entries of nested maps as one map's
    // (a Gemini agent conversation of 900 tool turns failed). The call's memory budget bounds what it builds
    // (checked before each operation), and the few functions that build as much as an argument asks are
    // checked against it before they build (`sized`, below).
    e.set_max_variables(1_000);
    e.set_max_functions(1_000);
    e.set_max_modules(0);
    e.on_progress(|operations| overspent(operations).map(Dynamic::from));
    e.on_print(|text| tracing::info!(target: "keyrelay::script", "{text}"));
    e.on_debug(|text, source, pos| tracing::debug!(target: "keyrelay::script", source, line = pos.line(), "{text}"));

    sized(&mut e);
    e.register_fn(
        "json_parse",
        |text: &str| -> Result<Dynamic, Box<EvalAltResult>> {
            serde_json::from_str::<Dynamic>(text).map_err(|err| format!("json_parse: {err}").into())
        },
    );
    e.register_fn("json_stringify", |value: Dynamic| stringify(&value));
    // Printing a map or an array as a whole is one operation that could build a string of any size (a map
    // holding the same long string many times): bounded like `json_stringify`, and written as JSON.
    for name in ["to_string", "to_debug"] {
        e.register_fn(name, |value: &mut Map| {
            stringify(&Dynamic::from_map(value.clone()))
        });
        e.register_fn(name, |value: &mut rhai::Array| {
            stringify(&Dynamic::from_array(value.clone()))
        });
    }
    e.register_fn("unix_time", || -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    });
    e.register_fn("unix_time_ms", || -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    });
    e.register_fn("random_id", |len: i64| -> String {
        let len = len.clamp(1, 64) as usize;
        (0..len).map(|_| fastrand::alphanumeric()).collect()
    });
    e.register_fn("parse_data_url", |url: &str| -> Dynamic {
        // data:<mime>;base64,<data>
        let Some(rest) = url.strip_prefix("data:") else {
            return Dynamic::UNIT;
        };
        let Some((meta, data)) = rest.split_once(',') else {
            return Dynamic::UNIT;
        };
        let mime = meta.strip_suffix(";base64").unwrap_or(meta);
        let mut map = Map::new();
        map.insert("mime_type".into(), Dynamic::from(mime.to_string()));
        map.insert("data".into(), Dynamic::from(data.to_string()));
        map.insert("base64".into(), Dynamic::from(meta.ends_with(";base64")));
        Dynamic::from_map(map)
    });
    // `refuse(field, message)`: the request asks for what the upstream cannot do; the client gets a 400 naming
    // `field` (a request hook's answer, not a script failure).
    e.register_fn(
        "refuse",
        |field: ImmutableString, message: ImmutableString| -> Result<(), Box<EvalAltResult>> {
            Err(Box::new(EvalAltResult::ErrorRuntime(
                Dynamic::from(Refused::new(field.as_str(), message.as_str())),
                rhai::Position::NONE,
            )))
        },
    );
    // `map.get_path("a.0.b")`: a nested value or (), without a chain of checks.
    e.register_fn(
        "get_path",
        |value: Dynamic, path: ImmutableString| -> Dynamic {
            let mut current = value;
            for step in path.split('.') {
                let next = if let Some(map) = current.read_lock::<Map>() {
                    map.get(step).cloned()
                } else if let Some(array) = current.read_lock::<rhai::Array>() {
                    step.parse::<usize>()
                        .ok()
                        .and_then(|i| array.get(i).cloned())
                } else {
                    None
                };
                match next {
                    Some(v) => current = v,
                    None => return Dynamic::UNIT,
                }
            }
            current
        },
    );
    e
}

/// `value` as JSON text, refused when it would be longer than the running call may still build or than a string
/// may be.
fn stringify(value: &Dynamic) -> Result<String, Box<EvalAltResult>> {
    let limit = memory_left().min(MAX_STRING);
    let mut out = Bounded {
        text: Vec::new(),
        limit,
    };
    match serde_json::to_writer(&mut out, value) {
        Ok(()) => Ok(String::from_utf8(out.text).unwrap_or_default()),
        Err(_) if out.text.len() >= limit => {
            Err(format!("the JSON text would be larger than {} MiB", limit >> 20).into())
        }
        Err(e) => Err(format!("json_stringify: {e}").into()),
    }
}

/// A writer that refuses to grow past `limit` bytes.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.text.resize(self.limit, 0);
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The refusal a script's error carries, if it is one (thrown by `refuse`, from any depth of calls).
pub fn refusal(err: &EvalAltResult) -> Option<Refused> {
    let mut current = err;
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = current {
        current = inner;
    }
    match current {
        EvalAltResult::ErrorRuntime(value, _) => value.clone().try_cast::<Refused>(),
        _ => None,
    }
}

/// A script that failed: which file, which function, which line, what happened.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("script {} failed in {function}{}: {message}", file.display(), where_(*line, *line_is_definition))]
pub struct ScriptError {
    pub file: PathBuf,
    pub function: String,
    pub line: Option<usize>,
    /// Rhai does not know where a limit was hit: `line` is then where the function is defined.
    pub line_is_definition: bool,
    pub message: String,
}

fn where_(line: Option<usize>, definition: bool) -> String {
    match (line, definition) {
        (Some(l), false) => format!(" at line {l}"),
        (Some(l), true) => format!(" (defined at line {l})"),
        (None, _) => String::new(),
    }
}

/// The line where each function of a script is defined, for errors Rhai cannot place.
pub fn function_lines(source: &str) -> Vec<(String, usize)> {
    source
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let rest = line
                .trim_start()
                .strip_prefix("private ")
                .unwrap_or(line.trim_start());
            let name = rest.strip_prefix("fn ")?.split('(').next()?.trim();
            Some((name.to_string(), i + 1))
        })
        .collect()
}

impl ScriptError {
    pub fn from_eval(
        file: &std::path::Path,
        hook: &str,
        err: &EvalAltResult,
        lines: &[(String, usize)],
    ) -> Self {
        // Errors raised inside helper functions are wrapped; report the innermost function and line.
        let mut function = hook.to_string();
        let mut current = err;
        while let EvalAltResult::ErrorInFunctionCall(name, _, inner, _) = current {
            function = name.clone();
            current = inner;
        }
        let message = match current {
            EvalAltResult::ErrorTooManyOperations(_) => {
                "it ran too long (operation limit reached)".to_string()
            }
            EvalAltResult::ErrorTerminated(why, _) => why.to_string(),
            EvalAltResult::ErrorDataTooLarge(what, _) => format!("{what} exceeds the size limit"),
            EvalAltResult::ErrorModuleNotFound(name, _) => {
                format!("module {name:?} cannot be imported (scripts cannot import)")
            }
            EvalAltResult::ErrorTooManyModules(_) => "scripts cannot import modules".to_string(),
            other => other
                .to_string()
                .split(" (line ")
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        let exact = current.position().line();
        let definition = lines
            .iter()
            .find(|(name, _)| *name == function)
            .map(|(_, line)| *line);
        Self {
            file: file.to_path_buf(),
            line: exact.or(definition),
            line_is_definition: exact.is_none() && definition.is_some(),
            function,
            message,
        }
    }
}

/// Refuses to build `bytes` more than the running call may still build.
fn afford(bytes: u128, what: &str) -> Result<(), Box<EvalAltResult>> {
    if bytes > memory_left() as u128 {
        return Err(format!(
            "{what} would be larger than the script's memory budget (scripts.memory)"
        )
        .into());
    }
    Ok(())
}

/// The padding and blob functions, which build as much as an argument asks in one operation, checked against the
/// call's memory budget before they build; otherwise as Rhai's own.
fn sized(e: &mut Engine) {
    fn wanted(len: rhai::INT) -> u128 {
        u128::try_from(len).unwrap_or(0)
    }
    e.register_fn(
        "pad",
        |s: &mut ImmutableString, len: rhai::INT, c: char| -> Result<(), Box<EvalAltResult>> {
            afford(wanted(len) * c.len_utf8() as u128, "pad")?;
            let have = s.chars().count();
            let len = wanted(len) as usize;
            if len > have {
                let p = s.make_mut();
                p.extend(std::iter::repeat_n(c, len - have));
            }
            Ok(())
        },
    );
    e.register_fn(
        "pad",
        |s: &mut ImmutableString,
         len: rhai::INT,
         padding: &str|
         -> Result<(), Box<EvalAltResult>> {
            afford(wanted(len) * 4, "pad")?;
            let len = wanted(len) as usize;
            let have = s.chars().count();
            if padding.is_empty() || len <= have {
                return Ok(());
            }
            let p = s.make_mut();
            p.extend(padding.chars().cycle().take(len - have));
            Ok(())
        },
    );
    e.register_fn(
        "pad",
        |array: &mut rhai::Array,
         len: rhai::INT,
         item: Dynamic|
         -> Result<(), Box<EvalAltResult>> {
            afford(wanted(len) * std::mem::size_of::<Dynamic>() as u128, "pad")?;
            let len = wanted(len) as usize;
            if len > array.len() {
                array.resize(len, item);
            }
            Ok(())
        },
    );
    e.register_fn(
        "pad",
        |blob: &mut rhai::Blob,
         len: rhai::INT,
         value: rhai::INT|
         -> Result<(), Box<EvalAltResult>> {
            afford(wanted(len), "pad")?;
            let len = wanted(len) as usize;
            if len > blob.len() {
                blob.resize(len, (value & 0xff) as u8);
            }
            Ok(())
        },
    );
    e.register_fn(
        "blob",
        |len: rhai::INT| -> Result<rhai::Blob, Box<EvalAltResult>> {
            afford(wanted(len), "blob")?;
            Ok(vec![0; wanted(len) as usize])
        },
    );
    e.register_fn(
        "blob",
        |len: rhai::INT, value: rhai::INT| -> Result<rhai::Blob, Box<EvalAltResult>> {
            afford(wanted(len), "blob")?;
            Ok(vec![(value & 0xff) as u8; wanted(len) as usize])
        },
    );
}
