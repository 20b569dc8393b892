//! Decisions every host makes the same way about a request, as pure
//! functions of what the host knows (no I/O, no Lua).
//!
//! - [`backends`]: the default balancer and backend health (which backend
//!   a request goes to when routing names none, and when a backend leaves
//!   and rejoins the rotation).
//! - [`breaker`]: the circuit breaker in front of the shared state (Redis).
//! - [`errors`]: the failures a host answers itself (type, status, code,
//!   message) and the type of a backend's error status.
//! - [`failure`]: which hooks shape the response to a failed request, and
//!   in what order (docs/adr/042).
//! - [`sse`]: what happens to one event of a backend's stream before
//!   `response_transform` (usage capture, the forced usage undone).
//! - [`usage`]: what a finished request is charged (quota, tokens per
//!   minute, ledger columns, usage metrics).
//! - [`limits`]: the standard rate limiter's token buckets (what a
//!   request takes, what is given back, what a response is charged).
//! - [`fleet`]: one node's view of limits shared by a fleet, settled with
//!   the shared store in batches.
//! - [`rate_stage`]: the limiter's verdict and the rate_limit script's,
//!   combined (admit, take without a check, refuse, give back).
//! - [`throttle`]: the auth throttle (clients that keep failing key
//!   checks).
//! - [`metrics`]: the metric catalog (names, types, help, labels).
//! - [`upstream`]: the body sent to a backend (the script's, or the
//!   client's bytes; `stream_options.include_usage` forced on streams).

pub mod backends;
pub mod breaker;
pub mod errors;
pub mod failure;
pub mod fleet;
pub mod limits;
pub mod metrics;
pub mod rate_stage;
pub mod sse;
pub mod throttle;
pub mod upstream;
pub mod usage;
