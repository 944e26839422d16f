//! Streaming: reading an upstream's SSE events, and the client-facing stream that forwards them.
//!
//! The client stream owns the upstream response and the key's lease. When the client disconnects, the body is
//! dropped, which drops the upstream connection and releases the key at once; no task is left pumping.

pub mod chunk;
mod events;
mod forward;
mod frame;
mod mapper;
mod peek;
pub mod sse;

use crate::keys::BoxFuture;
use crate::spec::ErrorClass;
use bytes::Bytes;
pub use chunk::{ChunkWriter, Part};
pub use events::UpstreamEvents;
pub use forward::{Forward, Report};
pub use frame::{error_frame, frame, is_done};
use futures_util::Stream;
pub use mapper::Mapper;
pub use peek::Usage;
use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

/// The bytes of a client-facing SSE stream.
pub type SseBody = Pin<Box<dyn Stream<Item = Result<Bytes, std::convert::Infallible>> + Send>>;

/// Asks for the rest of an answer whose stream broke, given the text sent so far: the client-facing stream of
/// the continuation, or `None` when it could not be had.
pub type Continuer = Box<dyn FnOnce(String) -> BoxFuture<'static, Option<SseBody>> + Send>;

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
}

impl StreamFault {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Stalled(_) => ErrorClass::Timeout,
            Self::Connection(_) | Self::Oversized | Self::ShuttingDown => ErrorClass::Connection,
        }
    }
}

/// A stream that has started: the rest of its events, how to map them, and the parts already mapped.
pub struct Started {
    pub events: UpstreamEvents,
    pub mapper: Mapper,
    pub pending: VecDeque<Part>,
}
