//! HTTP request rules every host shares, as pure data-in/data-out functions:
//! the API endpoints ([`api`]), the API key and request id a client
//! presents ([`client`]),
//! the canonical form of a request path ([`path`]), the OpenAI request fields
//! a host acts on ([`fields`]), the bounds of a request's head ([`head`]),
//! the hop-by-hop header names that are
//! never forwarded nor set by scripts ([`hop_by_hop`]), a message's headers
//! as scripts see them ([`script_headers`]), a backend's event stream split
//! into events ([`sse`]), and the `usage` of a backend's answer read
//! without parsing the rest ([`usage_probe`]).
//!
//! A host computes these once per request, before any hook runs, so every
//! decision (endpoint matching, transforms, billing, what goes upstream) is
//! made on the same view of the request.

pub mod api;
pub mod client;
pub mod fields;
pub mod head;
pub mod hop_by_hop;
pub mod path;
pub mod script_headers;
pub mod sse;
pub mod usage_probe;
