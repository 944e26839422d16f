//! Streaming: reading an upstream's SSE events, and the client-facing stream that forwards them.
//!
//! The client stream owns the upstream response and the key's lease. When the client disconnects, the body is
//! dropped, which drops the upstream connection and releases the key at once; no task is left pumping.

mod events;
mod forward;
mod mask;

use crate::failure::ErrorClass;
use crate::mapping::{EventMapper, Part};
pub use events::UpstreamEvents;
pub use forward::{Forward, Report};
use futures_util::future::BoxFuture;
pub use mask::StreamMask;
use std::collections::VecDeque;
use std::time::Duration;

/// A broken stream, as the continuer is told of it.
pub struct Break {
    /// The answer's text sent so far.
    pub text: String,
    /// The key that was serving.
    pub key: crate::secret::KeyId,
    /// The connection broke (a cut, a stall), rather than the upstream saying so with an error event: the same
    /// key may continue when no other is left.
    pub transport: bool,
}

/// A stream that takes over after a break: its first parts and the lease of the key that serves it.
pub struct Resumed {
    pub started: Started,
    pub lease: crate::lease::Lease,
    /// The `provider/model` that serves it, for logs.
    pub label: String,
    /// Its `provider/model` when it is a fallback model.
    pub fallback: Option<String>,
}

/// Asks for the rest of an answer whose stream broke: the stream that takes over (or `None` when none could be
/// had), and the attempts made to get it, for the request's journal. Called again if that one breaks too.
pub type Continuer = Box<
    dyn FnMut(Break) -> BoxFuture<'static, (Option<Resumed>, Vec<crate::observe::AttemptRecord>)>
        + Send,
>;

/// Why an upstream stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum StreamFault {
    #[error("the upstream connection failed: {0}")]
    Connection(String),
    #[error("the upstream sent nothing for {0:?}")]
    Stalled(Duration),
    #[error("the upstream sent an SSE event over 16 MiB")]
    Oversized,
    #[error("keyrelay is shutting down")]
    ShuttingDown,
    #[error("the stream lasted longer than timeouts.stream_total")]
    TooLong,
}

impl StreamFault {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Stalled(_) => ErrorClass::Timeout,
            Self::Connection(_) | Self::Oversized | Self::ShuttingDown | Self::TooLong => {
                ErrorClass::Connection
            }
        }
    }
}

/// A stream that has started: the rest of its events, how to map them, and the parts already mapped.
pub struct Started {
    pub events: UpstreamEvents,
    pub mapper: EventMapper,
    pub pending: VecDeque<Part>,
}
