//! `X-Request-ID`: accepted from the client when sane, generated otherwise
//! (core's [`llmproxy_core::http::client::request_id`], nginx's too).

/// The header name, lower case as hyper stores it.
pub const HEADER: &str = "x-request-id";

/// The client's id when core accepts it, else a new one.
pub fn accept_or_generate(client: Option<&[u8]>) -> String {
    llmproxy_core::http::client::request_id(client)
}
