//! The conversations kept for OpenAI Responses' `previous_response_id`, in process: each answer's id with the
//! chat messages that led to it and the answer itself, so that a follow-up naming it continues the conversation
//! on any provider. Bounded in entries, bytes and age (`responses:` in config.yaml); the oldest go first.
//!
//! With key state shared through Redis, each conversation is also written there (whole, for `max_age`), so that
//! a follow-up sent to another instance finds it.
//!
//! A turn keeps only its own messages and shares the turns before it, so a long conversation costs each turn
//! its own size. Each entry is accounted its whole conversation's size: shared turns are counted once per entry
//! that reaches them, so what is accounted is never less than what is held.

mod redis;

use crate::config::ResponsesStore;
use crate::keys::redis::RedisStore;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One turn of a kept conversation: its chat messages (instructions are not carried over, as OpenAI does not
/// carry them), after the turns before it.
#[derive(Debug)]
struct Turn {
    messages: Vec<Value>,
    before: Option<Conversation>,
    /// The serialized size of this turn and every turn before it.
    bytes: usize,
}

/// A kept conversation, up to one answer.
#[derive(Clone, Debug)]
pub struct Conversation(Arc<Turn>);

impl Conversation {
    /// `before` followed by `messages`.
    pub fn new(before: Option<Conversation>, messages: Vec<Value>) -> Self {
        let own: usize = messages.iter().map(|m| m.to_string().len()).sum();
        let bytes = own + before.as_ref().map_or(0, |b| b.0.bytes);
        Self(Arc::new(Turn {
            messages,
            before,
            bytes,
        }))
    }

    /// Every message, oldest first.
    pub fn messages(&self) -> Vec<Value> {
        let mut turns = Vec::new();
        let mut at = Some(self);
        while let Some(c) = at {
            turns.push(&c.0.messages);
            at = c.0.before.as_ref();
        }
        turns.into_iter().rev().flatten().cloned().collect()
    }

    pub fn bytes(&self) -> usize {
        self.0.bytes
    }
}

struct Entry {
    conversation: Conversation,
    at: Instant,
}

#[derive(Default)]
struct Kept {
    entries: HashMap<String, Entry>,
    /// Ids, oldest first.
    order: VecDeque<String>,
    bytes: usize,
}

#[derive(Default)]
pub struct Conversations {
    kept: Mutex<Kept>,
    /// Where conversations are also kept for other instances.
    shared: Option<Arc<RedisStore>>,
}

impl Conversations {
    /// Conversations kept here and in `shared` too.
    pub fn shared(shared: Arc<RedisStore>) -> Self {
        Self {
            kept: Mutex::default(),
            shared: Some(shared),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `conversation` under `id`, then drops the oldest until within `limits`. A conversation larger than
    /// the whole store is not kept.
    pub fn keep(&self, id: String, conversation: Conversation, limits: &ResponsesStore) {
        if let Some(shared) = &self.shared
            && conversation.bytes() <= limits.max_bytes
            && limits.max_entries > 0
        {
            let whole = Value::Array(conversation.messages()).to_string();
            redis::put(shared, &id, whole.into_bytes(), limits.max_age);
        }
        self.keep_local(id, conversation, limits);
    }

    /// The conversation kept under `id`, here or, failing that, by another instance.
    pub async fn find(&self, id: &str, limits: &ResponsesStore) -> Option<Conversation> {
        if let Some(found) = self.get(id, limits) {
            return Some(found);
        }
        let shared = self.shared.as_ref()?;
        let bytes = redis::fetch(shared, id).await?;
        // What another instance wrote is read as bounded as what this one keeps.
        if bytes.len() > limits.max_bytes {
            return None;
        }
        let Ok(Value::Array(messages)) = serde_json::from_slice(&bytes) else {
            return None;
        };
        let conversation = Conversation::new(None, messages);
        self.keep_local(id.to_string(), conversation.clone(), limits);
        Some(conversation)
    }

    /// [`Conversations::keep`], here only.
    fn keep_local(&self, id: String, conversation: Conversation, limits: &ResponsesStore) {
        let bytes = conversation.bytes();
        if bytes > limits.max_bytes || limits.max_entries == 0 {
            return;
        }
        let mut kept = self.lock();
        // Ids are ours and fresh: one kept already stays as it was.
        if kept.entries.contains_key(&id) {
            return;
        }
        kept.bytes += bytes;
        kept.order.push_back(id.clone());
        let at = Instant::now();
        kept.entries.insert(id, Entry { conversation, at });
        Self::trim(&mut kept, limits, at);
    }

    /// The conversation kept under `id`, if it is and is not too old.
    pub fn get(&self, id: &str, limits: &ResponsesStore) -> Option<Conversation> {
        let mut kept = self.lock();
        Self::trim(&mut kept, limits, Instant::now());
        kept.entries.get(id).map(|e| e.conversation.clone())
    }

    fn trim(kept: &mut Kept, limits: &ResponsesStore, now: Instant) {
        while let Some(oldest) = kept.order.front() {
            let stale = kept.entries.get(oldest).is_none_or(|e| {
                now.saturating_duration_since(e.at) > limits.max_age
                    || kept.entries.len() > limits.max_entries
                    || kept.bytes > limits.max_bytes
            });
            if !stale {
                break;
            }
            let id = kept.order.pop_front().expect("a front exists");
            if let Some(e) = kept.entries.remove(&id) {
                kept.bytes -= e.conversation.bytes();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn limits(max_entries: usize, max_bytes: usize, max_age: Duration) -> ResponsesStore {
        ResponsesStore {
            max_entries,
            max_bytes,
            max_age,
        }
    }

    fn one(text: &str) -> Conversation {
        Conversation::new(None, vec![json!({"role": "user", "content": text})])
    }

    #[test]
    fn keeps_within_entries_bytes_and_age() {
        let store = Conversations::default();
        let l = limits(2, 1 << 20, Duration::from_secs(60));
        for id in ["a", "b", "c"] {
            store.keep(id.into(), one(id), &l);
        }
        assert!(store.get("a", &l).is_none(), "the oldest went");
        assert_eq!(store.get("c", &l).unwrap().messages()[0]["content"], "c");
        assert_eq!(store.len(), 2);

        let small = limits(10, 100, Duration::from_secs(60));
        let store = Conversations::default();
        let big = || Conversation::new(None, vec![json!({"content": "x".repeat(60)})]);
        store.keep("1".into(), big(), &small);
        store.keep("2".into(), big(), &small);
        assert!(store.get("1", &small).is_none() && store.get("2", &small).is_some());
        store.keep("huge".into(), one(&"y".repeat(200)), &small);
        assert!(
            store.get("huge", &small).is_none(),
            "larger than the store: not kept"
        );

        let young = limits(10, 1 << 20, Duration::ZERO);
        let store = Conversations::default();
        store.keep("old".into(), one("o"), &young);
        std::thread::sleep(Duration::from_millis(2));
        assert!(store.get("old", &young).is_none());
        assert!(store.is_empty());
    }

    #[test]
    fn turns_share_what_came_before_and_are_accounted_whole() {
        let first = one("a");
        let second = Conversation::new(Some(first.clone()), vec![json!("b"), json!("c")]);
        let texts: Vec<Value> = second.messages();
        assert_eq!(
            texts,
            vec![
                json!({"role": "user", "content": "a"}),
                json!("b"),
                json!("c")
            ]
        );
        assert_eq!(second.bytes(), first.bytes() + 6);
        // A chain longer than the store is not kept, however small each turn.
        let l = limits(100, 50, Duration::from_secs(60));
        let store = Conversations::default();
        let mut at = one("start");
        for i in 0..20 {
            at = Conversation::new(Some(at), vec![json!("turn")]);
            store.keep(format!("r{i}"), at.clone(), &l);
        }
        assert!(store.get("r19", &l).is_none());
    }
}
