//! One gateway per fuzz process, in process, on a real 127.0.0.1 socket,
//! in front of the real mock backend, as `proxy/tests/common/mod.rs`
//! starts them for the integration tests.
//!
//! The config runs the example scripts on every hook
//! (`examples/scripts/*.lua`), with API keys and an admin token, so a
//! request goes through auth, rate limiting, routing, both transforms,
//! usage and the error handler.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use llmproxy_core::Config;
use llmproxy_server::mock::{MockOptions, MockServer};
use llmproxy_server::{Gateway, GatewayOptions, UsageEntry, UsageSink};
use tokio::runtime::Runtime;

/// The API key with a large quota (every model allowed).
pub const VIP_KEY: &str = "sk-fuzz-vip";
/// The admin token of `POST /admin/reload`.
pub const ADMIN_TOKEN: &str = "fuzz-admin-token-0123456789";

/// A running gateway and what keeps it running.
pub struct Harness {
    /// Where the gateway listens.
    pub addr: SocketAddr,
    _gateway: Gateway,
    _mock: MockServer,
    _runtime: Runtime,
}

/// Usage records are dropped: the fuzzer sends thousands of requests.
struct Discard;

impl UsageSink for Discard {
    fn record(&self, _entry: UsageEntry) {}
}

fn config_yaml(backend_url: &str) -> String {
    format!(
        r#"backends:
  - {{name: standard,         url: "{backend_url}", weight: 10}}
  - {{name: high-performance, url: "{backend_url}", weight: 10}}
  - {{name: ultra,            url: "{backend_url}", weight: 5}}
keys:
  - {{key: {VIP_KEY}, user_id: vip, total_quota: 2000000}}
  - {{key: sk-fuzz-basic, user_id: basic}}
admin: {{token: "{ADMIN_TOKEN}"}}
gateway:
  max_body_bytes: 65536
  retry: {{max_retries: 1}}
  timeouts: {{connect_ms: 1000, first_byte_ms: 3000, idle_ms: 3000}}
scripts:
  defaults: {{timeout_ms: 1000, memory_mb: 10}}
  routing:            {{script_file: scripts/routing.lua}}
  auth:               {{script_file: scripts/auth.lua, on_error: deny}}
  request_transform:  {{script_file: scripts/request_transform.lua}}
  response_transform: {{script_file: scripts/response_transform.lua}}
  rate_limit:         {{script_file: scripts/rate_limit.lua}}
  usage:              {{script_file: scripts/usage.lua}}
  error_handler:      {{script_file: scripts/error_handler.lua}}
"#
    )
}

fn start() -> Result<Harness, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let (gateway, mock) = runtime.block_on(async {
        let mock = MockServer::start(loopback, MockOptions::default())
            .await
            .map_err(|e| format!("mock backend: {e}"))?;
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let config = Config::from_yaml(&config_yaml(&mock.url()), &examples).map_err(|e| format!("config: {e}"))?;
        let options = GatewayOptions {
            usage_sink: Some(Arc::new(Discard)),
            ..GatewayOptions::default()
        };
        let gateway = Gateway::start(config, loopback, options).await?;
        Ok::<_, String>((gateway, mock))
    })?;
    Ok(Harness {
        addr: gateway.local_addr(),
        _gateway: gateway,
        _mock: mock,
        _runtime: runtime,
    })
}

/// The gateway of this process, started on first use.
///
/// # Panics
/// When the gateway cannot start: the harness cannot run at all.
pub fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| match start() {
        Ok(h) => h,
        Err(e) => panic!("fuzz harness: cannot start the gateway: {e}"),
    })
}
