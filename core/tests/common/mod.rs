//! Helpers shared by the tests of the hooks' lazy globals and results.

// Each test crate uses some of them.
#![allow(dead_code)]

use std::path::Path;

use llmproxy_core::{Config, Engine};

/// An engine with `script` as its one `hook`.
pub fn engine(hook: &str, script: &str) -> Engine {
    let yaml = format!(
        "scripts:\n  {hook}:\n    script: {}\n",
        serde_json::to_string(script).expect("text")
    );
    Engine::new(Config::from_yaml(&yaml, Path::new(".")).expect("config")).expect("engine")
}

/// An auth or rate_limit script that denies with what `expr` (an
/// expression, or a block starting with `local` that returns one) gives,
/// as a string reason.
pub fn reason_of(expr: &str) -> String {
    returning(expr, "{allow = false, reason = tostring(v)}")
}

/// A script that works out `v` from `expr` (an expression, or a block
/// starting with `local` that returns one), then returns `result`, a Lua
/// expression that reads `v`.
pub fn returning(expr: &str, result: &str) -> String {
    let body = if expr.starts_with("local") {
        expr.to_owned()
    } else {
        format!("return {expr}")
    };
    format!("local v = (function() {body} end)() return {result}")
}
