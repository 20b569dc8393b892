//! # llmproxy-core
//!
//! The scripting core of LLMProxy: it runs small, untrusted Lua scripts at the
//! seven decision points of an LLM API gateway and turns what they return into
//! typed, validated decisions. It opens no sockets and reads no file it was
//! not told to read (`script_file` entries of a config); hosts (the C ABI, the
//! LuaJIT module, the standalone gateway) translate, this crate decides.
//!
//! Table of contents:
//!
//! - [`config`]: the YAML configuration format, validated with key paths.
//! - [`engine`]: [`Engine`], built once from a [`Config`], with one typed entry
//!   point per hook and a JSON entry point for generic hosts.
//! - [`hooks`]: the typed inputs and outputs of every hook.
//! - [`sandbox`]: the safe environment, helper libraries and limits.
//! - [`pool`]: the bounded pool of sandboxed LuaJIT states.
//! - [`convert`]: lossless JSON <-> Lua conversion, lazy request bodies.
//! - [`http`]: request rules every host shares: the canonical path, the
//!   OpenAI field types, hop-by-hop headers.
//! - [`request_handle`]: one API request's life (route, upstream body,
//!   answer, charge) over one parse of each body, the hooks' failure policy
//!   applied.
//! - [`keys`]: API key records and the standard checks every host shares.
//! - [`admission`]: the auth decision over the checks and the script.
//! - [`clock`]: `current_time` for `rate_limit` scripts, in the configured zone.
//! - [`admin`]: the admin token policy for admin endpoints off loopback.
//! - [`policy`]: decisions every host makes alike (which hooks shape a
//!   failed request's response, and in what order).
//! - [`error`]: the error types of this crate.
//! - [`conformance`]: the shared conformance case format every host runs.

#![warn(missing_docs)]

pub mod admin;
pub mod admission;
pub mod clock;
pub mod config;
pub mod conformance;
pub mod convert;
pub mod engine;
pub mod error;
pub mod hooks;
pub mod http;
pub mod inline;
pub mod keys;
pub mod models;
pub mod policy;
pub mod pool;
pub mod redis_url;
pub mod request_handle;
pub mod sandbox;
pub mod shared_state;
pub mod small_object;
pub mod stack;
pub mod usage_estimate;
mod vm;

pub use config::Config;
pub use engine::Engine;
pub use error::{ConfigError, ErrorKind, HookError};
pub use hooks::HookName;

/// The version of this crate, as reported by every host.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
