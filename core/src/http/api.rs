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
