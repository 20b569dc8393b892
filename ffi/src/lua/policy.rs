//! `llmproxy.failure_step(facts)`: core's rule for which hook shapes a
//! failed request's response next (`llmproxy_core::policy::failure`,
//! docs/adr/042), so nginx and the gateway run error_handler and
//! response_transform for the same failures, in the same order.
//!
//! ```lua
//! llmproxy.failure_step({ source = "upstream", json_body = true,
//!     error_handler = true, caller_identified = true,
//!     response_transform = true, handled = "kept" })
//! --> "response_transform"   -- or "error_handler", "send"
//! ```

use llmproxy_core::policy::failure::{next_step, Facts, Handled, Source};
use mlua::{Lua, Table};

/// The Lua function.
pub(crate) fn failure_step(_: &Lua, t: Table) -> mlua::Result<&'static str> {
    let flag = |name: &str| -> mlua::Result<bool> { Ok(t.raw_get::<Option<bool>>(name)?.unwrap_or(false)) };
    let source = match t.raw_get::<Option<String>>("source")?.as_deref() {
        Some("gateway") | None => Source::Gateway,
        Some("upstream") => Source::Upstream {
            json_body: flag("json_body")?,
        },
        Some(other) => {
            return Err(mlua::Error::runtime(format!(
                "failure_step: source must be 'gateway' or 'upstream', not '{other}'"
            )))
        }
    };
    let handled = match t.raw_get::<Option<String>>("handled")? {
        None => Handled::NotRun,
        Some(h) => Handled::parse(&h).ok_or_else(|| {
            mlua::Error::runtime(format!(
                "failure_step: handled must be not_run, kept, replaced or denied, not '{h}'"
            ))
        })?,
    };
    let facts = Facts {
        source,
        error_handler: flag("error_handler")?,
        caller_identified: flag("caller_identified")?,
        response_transform: flag("response_transform")?,
    };
    Ok(next_step(&facts, handled).as_str())
}
