//! Dotted paths into JSON documents (`candidates.0.content.parts`), used by declared mappings.

use serde_json::Value;

/// A dotted path into a JSON document; numeric steps index arrays (`candidates.0.content`).
#[derive(Clone, Debug, PartialEq)]
pub struct JsonPath(Vec<Step>);

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

impl JsonPath {
    pub fn parse(text: &str) -> Option<Self> {
        if text.is_empty() {
            return None;
        }
        let steps = text
            .split('.')
            .map(|s| match s.parse::<usize>() {
                Ok(i) => Some(Step::Index(i)),
                Err(_) if !s.is_empty() => Some(Step::Key(s.to_string())),
                Err(_) => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self(steps))
    }

    /// The value at this path, unless it is missing or null.
    pub fn get<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        let mut at = root;
        for step in &self.0 {
            at = match step {
                Step::Key(k) => at.get(k.as_str())?,
                Step::Index(i) => at.get(*i)?,
            };
        }
        (!at.is_null()).then_some(at)
    }
}

impl JsonPath {
    /// Sets the value at this path, creating objects on the way; `false` if the path crosses a non-object or
    /// has an index step.
    pub fn set(&self, root: &mut Value, value: Value) -> bool {
        let mut at = root;
        for (i, step) in self.0.iter().enumerate() {
            let Step::Key(key) = step else { return false };
            let Value::Object(map) = at else { return false };
            if i + 1 == self.0.len() {
                map.insert(key.clone(), value);
                return true;
            }
            at = map
                .entry(key.clone())
                .or_insert_with(|| Value::Object(Default::default()));
        }
        false
    }

    /// Whether every step is an object key (a path `set` can write).
    pub fn is_keys_only(&self) -> bool {
        self.0.iter().all(|s| matches!(s, Step::Key(_)))
    }
}

/// Conditions on a JSON document, as declared mappings state them: paths that must equal given values
/// (`if:`), hold a non-null value (`present:`), or be missing or null (`absent:`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conditions {
    equals: Vec<(JsonPath, Value)>,
    present: Vec<JsonPath>,
    absent: Vec<JsonPath>,
}

impl Conditions {
    /// Parses the three lists with `path`, which reports a bad path and yields `None` for it.
    pub fn resolve(
        equals: &std::collections::BTreeMap<String, Value>,
        present: &[String],
        absent: &[String],
        path: &mut impl FnMut(&str) -> Option<JsonPath>,
    ) -> Self {
        Self {
            equals: equals
                .iter()
                .filter_map(|(k, v)| Some((path(k)?, v.clone())))
                .collect(),
            present: present.iter().filter_map(|p| path(p)).collect(),
            absent: absent.iter().filter_map(|p| path(p)).collect(),
        }
    }

    pub fn hold(&self, data: &Value) -> bool {
        self.equals.iter().all(|(p, v)| p.get(data) == Some(v))
            && self.present.iter().all(|p| p.get(data).is_some())
            && self.absent.iter().all(|p| p.get(data).is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn get_and_set() {
        let p = JsonPath::parse("a.0.b").unwrap();
        assert_eq!(p.get(&json!({"a": [{"b": 1}]})), Some(&json!(1)));
        assert_eq!(p.get(&json!({"a": [{"b": null}]})), None);
        assert!(JsonPath::parse("a..b").is_none());
        let mut doc = json!({"x": 1});
        assert!(
            JsonPath::parse("config.topP")
                .unwrap()
                .set(&mut doc, json!(0.5))
        );
        assert_eq!(doc, json!({"x": 1, "config": {"topP": 0.5}}));
        assert!(!p.set(&mut doc, json!(1)));
    }
}
