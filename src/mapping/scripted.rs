//! Scripted mappings: the provider's Rhai hooks (`request`, `response`, `stream_event`) as the bottom layer of
//! its mapping. [`crate::script`] runs them; this module only turns what they return into the seam's types.
//! Every call may be slow, so callers run them off the async workers.

use super::{
    Answer, AnswerMapping, ChunkWriter, Draft, Event, EventMapping, EventMappings, MapError, Part,
    RequestMapping, Step, Target,
};
use crate::script::{Hook, ProviderScript, ScriptError, ScriptStream};
use http::header::{HeaderName, HeaderValue};
use serde_json::Value;
use std::sync::Arc;

/// A provider's script, mapping in every direction it has a hook for.
#[derive(Debug)]
pub struct Scripted(pub Arc<ProviderScript>);

impl RequestMapping for Scripted {
    fn map(&self, target: &Target<'_>, body: Value) -> Result<Draft, MapError> {
        let script = &self.0;
        let hooked = script.map_request(target.endpoint, target.model, target.stream, &body)?;
        draft(hooked, target.model).map_err(|why| script.hook_error(Hook::Request, &why).into())
    }

    fn slow(&self) -> bool {
        true
    }
}

/// The call a request hook described. Where the hook put the client's model into the path, it goes as one
/// percent-encoded segment, whatever it holds (`/`, `?`, `#`, `%`): a model name never reaches another path or
/// the query. Encoding a look-alike in the rest of the path too can only break that request, never redirect it.
fn draft(m: crate::script::MappedRequest, model: &str) -> Result<Draft, String> {
    let segment = crate::upstream::path_segment(model);
    let path = if segment == model {
        m.path
    } else {
        m.path.replace(model, &segment)
    };
    let method = http::Method::from_bytes(m.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", m.method))?;
    let mut headers = Vec::with_capacity(m.headers.len() + 1);
    for (k, v) in m.headers {
        let name =
            HeaderName::try_from(k.as_str()).map_err(|_| format!("invalid header name {k:?}"))?;
        let value = HeaderValue::try_from(v.as_str())
            .map_err(|_| format!("invalid value for header {k:?}"))?;
        headers.push((name, value));
    }
    Ok(Draft {
        method,
        path,
        query: m.query,
        headers,
        body: m.body,
    })
}

impl AnswerMapping for Scripted {
    fn map(&self, endpoint: &str, model: &str, body: &[u8]) -> Result<Answer, ScriptError> {
        self.0
            .map_response(endpoint, model, body)
            .map(Answer::Mapped)
    }

    fn slow(&self) -> bool {
        true
    }
}

impl EventMappings for Scripted {
    fn start(&self, _: &str) -> Box<dyn EventMapping> {
        Box::new(Stream(self.0.stream()))
    }
}

/// One stream's `stream_event` hook and its state.
struct Stream(ScriptStream);

impl EventMapping for Stream {
    fn map(&mut self, event: Event, _: &mut ChunkWriter) -> Result<Step, ScriptError> {
        Ok(Step::Slow(event))
    }

    fn map_slow(
        &mut self,
        event: Event,
        chunks: &mut ChunkWriter,
    ) -> Result<Vec<Part>, ScriptError> {
        let (name, data) = event.into_parts();
        let parts = match data {
            Ok(data) => self.0.map(name.as_deref(), Ok(data))?,
            Err(text) => self.0.map(name.as_deref(), Err(&text))?,
        };
        Ok(parts.into_iter().flat_map(|p| chunks.part(p)).collect())
    }
}
