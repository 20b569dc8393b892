//! The built-in demo: what `llmproxy serve` runs without `--config`.
//!
//! Three in-process mock backends (`standard`, `high-performance`,
//! `ultra`) on free loopback ports, and the seed design's viplevel routing
//! script, so that right after `make serve`:
//!
//! ```text
//! curl localhost:8000/v1/chat/completions \
//!   -d '{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"viplevel":3}'
//! ```
//!
//! answers from `ultra` (`x-llmproxy-backend: ultra`); metrics are on the
//! admin listener, `curl localhost:8001/metrics`.

use std::net::SocketAddr;
use std::path::Path;

use llmproxy_core::Config;

use crate::mock::{MockOptions, MockServer};

/// The seed's routing example, verbatim (the same file the examples and
/// the benchmarks use).
pub const ROUTING_SCRIPT: &str = include_str!("../../examples/scripts/routing.lua");

/// Names of the demo backends, in config order.
pub const BACKENDS: [&str; 3] = ["standard", "high-performance", "ultra"];

/// The demo config for backends at the given URLs (same order as
/// [`BACKENDS`]).
pub fn config_yaml(urls: &[String]) -> String {
    let mut yaml = String::from("listen: \":8000\"\nadmin:\n  listen: \"127.0.0.1:8001\"\n\nbackends:\n");
    for (name, url) in BACKENDS.iter().zip(urls) {
        yaml.push_str(&format!("  - name: \"{name}\"\n    url: \"{url}\"\n    weight: 10\n"));
    }
    yaml.push_str("\ngateway:\n  models: [\"gpt-4\", \"gpt-3.5\"]\n\nscripts:\n  routing:\n    script: |\n");
    for line in ROUTING_SCRIPT.lines() {
        yaml.push_str("      ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

/// Start the three mock backends and return the demo config.
pub async fn start() -> Result<(Config, Vec<MockServer>), String> {
    let mut mocks = Vec::new();
    for name in BACKENDS {
        let options = MockOptions {
            name: name.to_owned(),
            chunk_delay_ms: 20,
            ..MockOptions::default()
        };
        let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
            .await
            .map_err(|e| format!("cannot start the demo backend '{name}': {e}"))?;
        mocks.push(mock);
    }
    let urls: Vec<String> = mocks.iter().map(MockServer::url).collect();
    let config = Config::from_yaml(&config_yaml(&urls), Path::new(".")).map_err(|e| format!("demo config: {e}"))?;
    Ok((config, mocks))
}
