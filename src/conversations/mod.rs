//! The conversations kept for OpenAI Responses' `previous_response_id`, in process: each answer's id with the
//! chat messages that led to it and the answer itself, so that a follow-up naming it continues the conversation
//! on any provider. Bounded in entries, bytes and age (`responses:` in config.yaml); the oldest go first.
//!
//! A conversation is kept as its JSON text, whole (one array of chat messages), and parsed only when a follow-up
//! uses it: parsed values take tens of times their text's size (a part `{"type":"text","text":"a"}` is 27 bytes
//! as text and about 700 parsed). Turns share nothing: each entry holds its own copy of the turns before it,
//! so what is accounted is what is held, to the byte (plus [`ENTRY_OVERHEAD`] for the entry's bookkeeping), and
//! dropping an entry frees what it was accounted.
//!
//! With key state shared through Redis, each conversation is also written there, the same text, so that a
//! follow-up sent to another instance finds it; what an instance writes there is bounded as what it keeps
//! ([`redis`]).

mod redis;

use crate::config::ResponsesStore;
use crate::keys::redis::RedisStore;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What an entry costs beyond its text: its id twice (the map's key and the order's), the map's slot, the
/// order's slot and the text's shared header, rounded up.
pub const ENTRY_OVERHEAD: usize = 256;

/// A kept conversation, up to one answer: its chat messages, oldest first, as one JSON array. Instructions are
/// not carried over, as OpenAI does not carry them.
#[derive(Clone, Debug)]
pub struct Conversation(Arc<[u8]>);

impl Conversation {
    /// `before` followed by `messages`.
    pub fn new(before: Option<&Conversation>, messages: &[Value]) -> Self {
        let mut text = Vec::new();
        match before {
            // `[` and the messages before, without the closing `]`.
            Some(before) if before.0.len() > 2 => {
                let earlier = &before.0[..before.0.len() - 1];
                text.reserve_exact(earlier.len() + 64 * messages.len() + 1);
                text.extend_from_slice(earlier);
                if !messages.is_empty() {
                    text.push(b',');
                }
            }
            _ => text.push(b'['),
        }
        for (i, message) in messages.iter().enumerate() {
            if i > 0 {
                text.push(b',');
            }
            serde_json::to_writer(&mut text, message).expect("a JSON value always serialises");
        }
        text.push(b']');
        Self(Arc::from(text))
    }

    /// A conversation as another instance wrote it (checked when it is used: [`Conversation::messages`]).
    pub fn from_json(text: Vec<u8>) -> Self {
        Self(Arc::from(text))
    }

    /// Every message, oldest first, parsed now; none if the text is not a JSON array (written by something
    /// else than keyrelay).
    pub fn messages(&self) -> Option<Vec<Value>> {
        serde_json::from_slice(&self.0).ok()
    }

    /// The conversation as JSON text (an array of chat messages).
    pub fn json(&self) -> &[u8] {
        &self.0
    }

    /// The size of its text.
    pub fn bytes(&self) -> usize {
        self.0.len()
    }

    /// What keeping it costs: its text and the entry's bookkeeping.
    fn cost(&self) -> usize {
        self.0.len() + ENTRY_OVERHEAD
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
    /// What the entries cost ([`Conversation::cost`]).
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
    /// the whole store is not kept, here or in Redis.
    pub fn keep(&self, id: String, conversation: Conversation, limits: &ResponsesStore) {
        if !fits(&conversation, limits) {
            return;
        }
        if let Some(shared) = &self.shared {
            redis::put(shared, &id, &conversation, limits);
        }
        self.keep_local(id, conversation, limits);
    }

    /// The conversation kept under `id`, here or, failing that, by another instance.
    pub async fn find(&self, id: &str, limits: &ResponsesStore) -> Option<Conversation> {
        if let Some(found) = self.get(id, limits) {
            return Some(found);
        }
        let shared = self.shared.as_ref()?;
        // What another instance wrote is read as bounded as what this one keeps.
        let text = redis::fetch(shared, id, limits.max_bytes).await?;
        let conversation = Conversation::from_json(text);
        self.keep_local(id.to_string(), conversation.clone(), limits);
        Some(conversation)
    }

    /// [`Conversations::keep`], here only.
    fn keep_local(&self, id: String, conversation: Conversation, limits: &ResponsesStore) {
        if !fits(&conversation, limits) {
            return;
        }
        let mut kept = self.lock();
        // Ids are ours and fresh: one kept already stays as it was.
        if kept.entries.contains_key(&id) {
            return;
        }
        kept.bytes += conversation.cost();
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
                kept.bytes -= e.conversation.cost();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the kept conversations cost, as accounted against `responses.max_size`.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Whether a conversation may be kept at all: within the store's size on its own.
fn fits(conversation: &Conversation, limits: &ResponsesStore) -> bool {
    limits.max_entries > 0 && conversation.cost() <= limits.max_bytes
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
        Conversation::new(None, &[json!({"role": "user", "content": text})])
    }

    #[test]
    fn keeps_within_entries_bytes_and_age() {
        let store = Conversations::default();
        let l = limits(2, 1 << 20, Duration::from_secs(60));
        for id in ["a", "b", "c"] {
            store.keep(id.into(), one(id), &l);
        }
        assert!(store.get("a", &l).is_none(), "the oldest went");
        assert_eq!(
            store.get("c", &l).unwrap().messages().unwrap()[0]["content"],
            "c"
        );
        assert_eq!(store.len(), 2);

        let small = limits(10, 2 * ENTRY_OVERHEAD + 150, Duration::from_secs(60));
        let store = Conversations::default();
        let big = || Conversation::new(None, &[json!({"content": "x".repeat(60)})]);
        store.keep("1".into(), big(), &small);
        store.keep("2".into(), big(), &small);
        assert!(store.get("1", &small).is_none() && store.get("2", &small).is_some());
        assert!(store.bytes() <= small.max_bytes);
        store.keep("huge".into(), one(&"y".repeat(2 * ENTRY_OVERHEAD)), &small);
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
        assert_eq!(store.bytes(), 0, "what went is no longer accounted");
    }

    #[test]
    fn a_turn_holds_the_turns_before_it_and_is_accounted_what_it_holds() {
        let first = one("a");
        let second = Conversation::new(Some(&first), &[json!("b"), json!("c")]);
        assert_eq!(
            second.messages().unwrap(),
            vec![
                json!({"role": "user", "content": "a"}),
                json!("b"),
                json!("c")
            ]
        );
        let plain = Conversation::new(None, &[json!("a")]);
        let plain = Conversation::new(Some(&plain), &[json!("b"), json!({"c": [1]})]);
        assert_eq!(plain.json(), br#"["a","b",{"c":[1]}]"#);
        let empty = Conversation::new(None, &[]);
        assert_eq!(empty.json(), b"[]");
        assert_eq!(Conversation::new(Some(&empty), &[json!(1)]).json(), b"[1]");
        assert_eq!(Conversation::new(Some(&first), &[]).json(), first.json());

        // Accounted: each entry's text and its bookkeeping, exactly.
        let store = Conversations::default();
        let l = limits(100, 1 << 20, Duration::from_secs(60));
        store.keep("1".into(), first.clone(), &l);
        store.keep("2".into(), second.clone(), &l);
        assert_eq!(
            store.bytes(),
            first.bytes() + second.bytes() + 2 * ENTRY_OVERHEAD
        );
        // A chain longer than the store is not kept, however small each turn.
        let l = limits(100, ENTRY_OVERHEAD + 50, Duration::from_secs(60));
        let store = Conversations::default();
        let mut at = one("start");
        for i in 0..20 {
            at = Conversation::new(Some(&at), &[json!("turn")]);
            store.keep(format!("r{i}"), at.clone(), &l);
        }
        assert!(store.get("r19", &l).is_none());
        assert!(store.bytes() <= l.max_bytes);
    }

    #[test]
    fn text_from_elsewhere_is_used_only_as_a_json_array() {
        let good = Conversation::from_json(b"[{\"role\":\"user\"}]".to_vec());
        assert_eq!(good.messages(), Some(vec![json!({"role": "user"})]));
        for bad in [&b"{}"[..], b"[", b"not json", b"[1,]", b""] {
            assert!(
                Conversation::from_json(bad.to_vec()).messages().is_none(),
                "{bad:?}"
            );
        }
    }
}
