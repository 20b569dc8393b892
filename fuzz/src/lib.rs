//! Helpers shared by the fuzz targets in `fuzz_targets/`: the checks each
//! target asserts, kept apart from the libFuzzer entry points so that they
//! read as plain functions.
//!
//! - [`json`]: comparing a JSON value with what came back from Lua.
//! - [`http`]: reading raw HTTP/1.1 responses and checking their framing.
//! - [`gateway`]: one gateway (and mock backend) per fuzz process.

#![warn(missing_docs)]

pub mod gateway;
pub mod http;
pub mod json;
