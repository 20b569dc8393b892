//! The C ABI: `llmp_*` functions and types, as declared in
//! `include/llmproxy.h`.
//!
//! Rules every function follows (see `docs/c-api.md`):
//!
//! - a fallible function returns an [`llmp_result`]; `LLMP_OK` is 0, caller
//!   mistakes are 1xxx, script failures 2xxx, engine failures 3xxx;
//! - outputs go only through out-parameters, written only on success; the
//!   optional `llmp_error **err` is written only on failure;
//! - a NULL or malformed argument is `LLMP_INVALID_ARGUMENT`, never a crash;
//! - every body runs inside [`boundary::call`]: a Rust panic becomes
//!   `LLMP_PANIC`, it never unwinds into C;
//! - every object handed out has exactly one `_free` function, and
//!   `_free(NULL)` is a no-op.

pub mod boundary;
pub mod engine;
pub mod error;
pub mod globals;
pub mod handle;
pub mod request;

pub use engine::llmp_engine;
pub use error::{llmp_error, llmp_result};
pub use globals::llmp_globals;
pub use handle::llmp_handle;
pub use request::llmp_request;
