//! One stream's mapping at run time: each event tries the cheap layers on the async worker, and goes off it
//! only for the slow ones (a script).

use super::{ChunkWriter, Event, EventMapping, Part, Step};
use crate::script::ScriptError;
use crate::sse::SseEvent;

/// A stream's mapping layers and the chunk writer they share.
pub struct EventMapper {
    /// Away while a slow call runs off the async workers.
    layers: Option<(Box<dyn EventMapping>, ChunkWriter)>,
}

impl EventMapper {
    pub fn new(layers: Box<dyn EventMapping>, chunks: ChunkWriter) -> Self {
        Self {
            layers: Some((layers, chunks)),
        }
    }

    /// Maps one event: on the calling thread where a cheap layer can, else off the async workers.
    pub async fn map(&mut self, event: SseEvent) -> Result<Vec<Part>, ScriptError> {
        match self.map_cheap(event)? {
            Step::Mapped(parts) => Ok(parts),
            Step::Slow(event) => self.map_slow(event).await,
        }
    }

    /// Maps one event if a cheap layer can; otherwise hands it back for [`Self::map_slow`].
    pub fn map_cheap(&mut self, event: SseEvent) -> Result<Step, ScriptError> {
        match &mut self.layers {
            Some((layers, chunks)) => layers.map(Event::new(event), chunks),
            None => Ok(Step::Mapped(Vec::new())),
        }
    }

    /// Maps an event that [`Self::map_cheap`] handed back, off the async workers.
    pub async fn map_slow(&mut self, event: Event) -> Result<Vec<Part>, ScriptError> {
        let Some((mut layers, mut chunks)) = self.layers.take() else {
            return Ok(Vec::new());
        };
        let (layers, chunks, parts) =
            crate::offload::run(crate::offload::Pool::Scripts, move || {
                let parts = layers.map_slow(event, &mut chunks);
                (layers, chunks, parts)
            })
            .await;
        self.layers = Some((layers, chunks));
        parts
    }

    /// Maps one event on the calling thread, slow layers included: for callers that are not async workers
    /// (benchmarks, tools).
    pub fn map_blocking(&mut self, event: SseEvent) -> Result<Vec<Part>, ScriptError> {
        let Some((layers, chunks)) = &mut self.layers else {
            return Ok(Vec::new());
        };
        match layers.map(Event::new(event), chunks)? {
            Step::Mapped(parts) => Ok(parts),
            Step::Slow(event) => layers.map_slow(event, chunks),
        }
    }
}
