//! Upstream and client JSON as seen by scripts: read-only views into one shared, parsed document.
//!
//! Rhai copies a map or array whenever a script reads it (`let b = event.data;` copies the whole event). For
//! the documents crossing into hooks — request bodies, responses, stream events — that copying dominated the
//! cost of a call. Instead a script receives views: an object or array inside a shared `serde_json::Value`, so
//! reading a nested field costs a pointer walk, not a copy. Views behave like maps and arrays (`type_of` says
//! `"map"` / `"array"`, property access, indexing, `for` loops, `len`, `keys`, `in`); they cannot be modified —
//! `to_map()` / `to_array()` make a modifiable copy. Leaves (strings, numbers, booleans, null) are plain values.

use rhai::{Dynamic, Engine, ImmutableString, Map};
use serde_json::Value;
use std::sync::Arc;

#[derive(Debug)]
enum Step {
    Key(ImmutableString),
    Index(usize),
}

/// A position inside a document, as a chain of steps back to the root.
#[derive(Debug)]
struct PathNode {
    parent: Option<Arc<PathNode>>,
    step: Step,
}

#[derive(Clone, Debug)]
struct View {
    root: Arc<Value>,
    path: Option<Arc<PathNode>>,
}

impl View {
    fn node(&self) -> &Value {
        fn walk<'a>(root: &'a Value, path: &Option<Arc<PathNode>>) -> &'a Value {
            let Some(node) = path else { return root };
            let parent = walk(root, &node.parent);
            match &node.step {
                Step::Key(k) => parent.get(k.as_str()),
                Step::Index(i) => parent.get(*i),
            }
            .unwrap_or(&Value::Null)
        }
        walk(&self.root, &self.path)
    }

    fn child(&self, step: Step, value: &Value) -> Dynamic {
        match value {
            Value::Object(_) | Value::Array(_) => {
                let view = View {
                    root: self.root.clone(),
                    path: Some(Arc::new(PathNode {
                        parent: self.path.clone(),
                        step,
                    })),
                };
                if value.is_object() {
                    Dynamic::from(JsonObject(view))
                } else {
                    Dynamic::from(JsonArray(view))
                }
            }
            leaf => leaf_to_dynamic(leaf),
        }
    }
}

/// A JSON object inside a shared document.
#[derive(Clone, Debug)]
pub struct JsonObject(View);

/// A JSON array inside a shared document.
#[derive(Clone, Debug)]
pub struct JsonArray(View);

fn leaf_to_dynamic(value: &Value) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from(i),
            None => Dynamic::from(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        other => to_dynamic_copy(other),
    }
}

/// A whole document as a script value: a view for objects and arrays.
pub fn view(value: Value) -> Dynamic {
    let root = Arc::new(value);
    let top = View {
        root: root.clone(),
        path: None,
    };
    match &*root {
        Value::Object(_) => Dynamic::from(JsonObject(top)),
        Value::Array(_) => Dynamic::from(JsonArray(top)),
        leaf => leaf_to_dynamic(leaf),
    }
}

/// A modifiable copy (native maps and arrays all the way down).
fn to_dynamic_copy(value: &Value) -> Dynamic {
    match value {
        Value::Object(m) => Dynamic::from_map(
            m.iter()
                .map(|(k, v)| (k.as_str().into(), to_dynamic_copy(v)))
                .collect::<Map>(),
        ),
        Value::Array(a) => Dynamic::from_array(a.iter().map(to_dynamic_copy).collect()),
        leaf => leaf_to_dynamic(leaf),
    }
}

/// A script value as JSON: native maps and arrays, views (their part of the document), leaves; `()` is null.
pub fn to_value(value: &Dynamic) -> Value {
    if value.is_unit() {
        return Value::Null;
    }
    if let Some(s) = value.read_lock::<ImmutableString>() {
        return Value::String(s.to_string());
    }
    if let Ok(i) = value.as_int() {
        return Value::from(i);
    }
    if let Ok(f) = value.as_float() {
        return serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
    }
    if let Ok(b) = value.as_bool() {
        return Value::Bool(b);
    }
    if let Some(map) = value.read_lock::<Map>() {
        return Value::Object(
            map.iter()
                .map(|(k, v)| (k.to_string(), to_value(v)))
                .collect(),
        );
    }
    if let Some(array) = value.read_lock::<rhai::Array>() {
        return Value::Array(array.iter().map(to_value).collect());
    }
    if let Some(o) = value.read_lock::<JsonObject>() {
        return o.0.node().clone();
    }
    if let Some(a) = value.read_lock::<JsonArray>() {
        return a.0.node().clone();
    }
    if let Ok(c) = value.as_char() {
        return Value::String(c.to_string());
    }
    Value::String(value.to_string())
}

impl IntoIterator for JsonArray {
    type Item = Dynamic;
    type IntoIter = std::vec::IntoIter<Dynamic>;

    fn into_iter(self) -> Self::IntoIter {
        let items: Vec<Dynamic> = match self.0.node() {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| self.0.child(Step::Index(i), v))
                .collect(),
            _ => Vec::new(),
        };
        items.into_iter()
    }
}

/// Registers the view types and their methods.
pub fn register(e: &mut Engine) {
    e.register_type_with_name::<JsonObject>("map");
    e.register_type_with_name::<JsonArray>("array");
    e.register_iterator::<JsonArray>();

    e.register_indexer_get(|o: &mut JsonObject, key: ImmutableString| -> Dynamic {
        match o.0.node().get(key.as_str()) {
            Some(v) => o.0.child(Step::Key(key), v),
            None => Dynamic::UNIT,
        }
    });
    e.register_indexer_get(|a: &mut JsonArray, index: i64| -> Dynamic {
        let node = a.0.node();
        let len = node.as_array().map_or(0, Vec::len) as i64;
        let i = if index < 0 { len + index } else { index };
        match (i >= 0).then(|| node.get(i as usize)).flatten() {
            Some(v) => a.0.child(Step::Index(i as usize), v),
            None => Dynamic::UNIT,
        }
    });
    e.register_fn("len", |o: &mut JsonObject| {
        o.0.node().as_object().map_or(0, |m| m.len()) as i64
    });
    e.register_fn("len", |a: &mut JsonArray| {
        a.0.node().as_array().map_or(0, Vec::len) as i64
    });
    e.register_fn("is_empty", |o: &mut JsonObject| {
        o.0.node().as_object().is_none_or(|m| m.is_empty())
    });
    e.register_fn("is_empty", |a: &mut JsonArray| {
        a.0.node().as_array().is_none_or(Vec::is_empty)
    });
    e.register_fn("keys", |o: &mut JsonObject| -> rhai::Array {
        o.0.node()
            .as_object()
            .map(|m| m.keys().map(|k| Dynamic::from(k.clone())).collect())
            .unwrap_or_default()
    });
    e.register_fn("contains", |o: &mut JsonObject, key: ImmutableString| {
        o.0.node().get(key.as_str()).is_some()
    });
    e.register_fn("to_map", |o: &mut JsonObject| to_dynamic_copy(o.0.node()));
    e.register_fn("to_map", |m: &mut Map| Dynamic::from_map(m.clone()));
    e.register_fn("to_array", |a: &mut JsonArray| to_dynamic_copy(a.0.node()));
    e.register_fn("to_array", |a: &mut rhai::Array| {
        Dynamic::from_array(a.clone())
    });
    e.register_fn("to_string", |o: &mut JsonObject| o.0.node().to_string());
    e.register_fn("to_string", |a: &mut JsonArray| a.0.node().to_string());
    e.register_fn("to_debug", |o: &mut JsonObject| o.0.node().to_string());
    e.register_fn("to_debug", |a: &mut JsonArray| a.0.node().to_string());
}
