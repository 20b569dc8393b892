//! # llmproxy-server
//!
//! The standalone LLMProxy gateway: an OpenAI-compatible HTTP gateway on
//! hyper/tokio whose decisions are the Lua hooks of `llmproxy-core`.
//!
//! Table of contents:
//!
//! - [`cli`]: the `llmproxy` command line (`serve`, `mock-backend`, `check`,
//!   `hook`, `keys`, `usage`).
//! - [`admin_cli`]: the operator's `keys` and `usage` subcommands.
//! - [`atomic_file`]: replacing a secrets file atomically, keeping its mode.
//! - [`gateway`]: the gateway itself (server, pipeline, balancer, health,
//!   upstream, SSE relay, errors, metrics, request ids).
//! - [`mock`]: an OpenAI-compatible fake backend for the demo, the tests and
//!   the benchmarks.
//! - [`demo`]: the built-in demo configuration (three mock backends and the
//!   seed's viplevel routing script).
//! - [`listen`]: parsing of listen addresses (`":8000"`, `"host:port"`).

pub mod admin_cli;
pub mod atomic_file;
pub mod cli;
pub mod demo;
pub mod gateway;
pub mod listen;
pub mod mock;

pub use gateway::{Gateway, GatewayOptions, UsageEntry, UsageSink};
