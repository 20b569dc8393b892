//! The OpenAI API endpoints a gateway understands: their bodies are JSON
//! that hooks read and transforms rewrite, and their answers carry usage.
//! Any other path is relayed as is.

/// An API endpoint (`POST` to its path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`.
    ChatCompletions,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
}

impl Api {
    /// The endpoint at the canonical path `path`, if it is one.
    pub fn from_path(path: &str) -> Option<Api> {
        match path {
            "/v1/chat/completions" => Some(Api::ChatCompletions),
            "/v1/completions" => Some(Api::Completions),
            "/v1/embeddings" => Some(Api::Embeddings),
            _ => None,
        }
    }

    /// The endpoint a request with `method` to the canonical `path` is
    /// for: only a `POST` is an API call (any other method is relayed as
    /// is).
    pub fn of_request(method: &str, path: &str) -> Option<Api> {
        if method == "POST" {
            Api::from_path(path)
        } else {
            None
        }
    }

    /// The endpoint's name: `chat_completions`, `completions`, `embeddings`.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat_completions",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
        }
    }

    /// Whether a stream of this endpoint can end with a usage chunk.
    pub fn streams_usage(self) -> bool {
        matches!(self, Api::ChatCompletions | Api::Completions)
    }
}

/// Whether a backend's answer is relayed as server-sent events, event by
/// event (usage read and `response_transform` run per event): the request
/// asked for a stream, the answer is a success, and its `Content-Type` is
/// `text/event-stream` (in any case). Any other answer is read whole.
pub fn answer_is_stream(asked_stream: bool, status: u16, content_type: Option<&str>) -> bool {
    asked_stream
        && (200..300).contains(&status)
        && content_type.is_some_and(|ct| {
            let ct = ct.trim_start().as_bytes();
            ct.len() >= 17 && ct[..17].eq_ignore_ascii_case(b"text/event-stream")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_successful_event_stream_asked_for_is_relayed_as_events() {
        let cases = [
            (true, 200, Some("text/event-stream"), true),
            (true, 200, Some(" Text/Event-Stream; charset=utf-8"), true),
            (false, 200, Some("text/event-stream"), false),
            (true, 500, Some("text/event-stream"), false),
            (true, 200, Some("application/json"), false),
            (true, 200, Some("text/event"), false),
            (true, 200, None, false),
        ];
        for (asked, status, ct, want) in cases {
            assert_eq!(answer_is_stream(asked, status, ct), want, "{asked} {status} {ct:?}");
        }
    }
}
