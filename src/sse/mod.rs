//! Server-Sent Events on the wire: the incremental parser (`parser`), frames as clients receive them (`frame`),
//! and what is read of an OpenAI chunk without building it (`peek`).

mod frame;
mod parser;
mod peek;

use bytes::Bytes;
pub use frame::{error_frame, frame, is_done, named_frame, upstream_error_frame};
use futures_util::Stream;
pub use parser::{Oversized, SseEvent, SseParser};
pub use peek::{ChoicePeek, ChunkPeek};
use std::pin::Pin;

/// The bytes of a client-facing SSE stream.
pub type SseBody = Pin<Box<dyn Stream<Item = Result<Bytes, std::convert::Infallible>> + Send>>;
