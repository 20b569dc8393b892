//! Decisions every host makes the same way about a request, as pure
//! functions of what the host knows (no I/O, no Lua).
//!
//! - [`failure`]: which hooks shape the response to a failed request, and
//!   in what order (docs/adr/042).

pub mod failure;
