//! Helpers shared by the tests of the admission hooks' lazy globals.

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
    let body = if expr.starts_with("local") {
        expr.to_owned()
    } else {
        format!("return {expr}")
    };
    format!("local v = (function() {body} end)() return {{allow = false, reason = tostring(v)}}")
}
