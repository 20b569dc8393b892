//! The `gateway:` config section and the example gateway config.

use std::path::Path;

use llmproxy_core::config::BalancerKind;
use llmproxy_core::Config;
use llmproxy_server::{Gateway, GatewayOptions};

fn problems(yaml: &str) -> Vec<String> {
    Config::from_yaml(yaml, Path::new("."))
        .map(|_| Vec::new())
        .unwrap_or_else(|e| e.problems)
}

#[test]
fn the_example_gateway_config_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/configs/gateway.yaml");
    let c = Config::from_file(path).expect("example config");
    let g = &c.gateway;
    assert_eq!(g.balancer, BalancerKind::WeightedRoundRobin);
    assert_eq!(g.max_body_bytes, 10 << 20);
    assert_eq!(g.models, ["gpt-4", "gpt-3.5"]);
    assert_eq!(g.retry.max_retries, 2);
    assert_eq!(
        (g.max_connections, g.body_read_timeout_ms, g.write_timeout_ms),
        (1024, 30_000, 30_000)
    );
    assert_eq!((g.max_event_bytes, g.hook_queue), (1 << 20, 1024));
    assert_eq!((g.inline_budget_ms, g.workers), (1, 0));
    assert_eq!(c.backends[2].timeouts.first_byte_ms, Some(30000));
    assert_eq!(
        c.backends[1].headers.get("Authorization").map(String::as_str),
        Some("Bearer sk-upstream-key")
    );
    let engine = llmproxy_core::Engine::new(c).expect("scripts compile");
    assert!(engine.is_enabled(llmproxy_core::HookName::Usage));
}

#[test]
fn the_gateway_section_is_optional_and_checked() {
    let base = "backends:\n  - {name: a, url: \"http://127.0.0.1:1\"}\n";
    let c = Config::from_yaml(base, Path::new(".")).unwrap();
    assert_eq!(c.gateway, Default::default());
    assert_eq!(c.gateway.timeouts.first_byte_ms, 60_000);

    let p = problems(&format!("{base}gateway:\n  balancer: random\n"));
    assert!(p[0].starts_with("gateway.balancer: unknown variant `random`"), "{p:?}");
    let p = problems(&format!("{base}gateway:\n  retyr: {{}}\n"));
    assert!(p[0].starts_with("gateway.retyr: unknown field `retyr`"), "{p:?}");
    let p = problems(&format!(
        "{base}gateway:\n  max_body_bytes: 0\n  retry:\n    max_retries: 50\n    on_status: [999]\n  timeouts:\n    idle_ms: 0\n"
    ));
    assert_eq!(
        p,
        [
            "gateway.max_body_bytes: must be > 0",
            "gateway.retry.max_retries: 50 is out of range (0..=10)",
            "gateway.retry.on_status[0]: 999 is not an HTTP status",
            "gateway.timeouts.idle_ms: must be > 0",
        ]
    );
    let p = problems(&format!(
        "{base}gateway:\n  max_connections: 0\n  body_read_timeout_ms: 0\n  write_timeout_ms: 0\n  max_event_bytes: 0\n  hook_queue: 0\n  workers: 5000\n"
    ));
    assert_eq!(
        p,
        [
            "gateway.max_connections: must be > 0",
            "gateway.body_read_timeout_ms: must be > 0",
            "gateway.write_timeout_ms: must be > 0",
            "gateway.max_event_bytes: must be > 0",
            "gateway.hook_queue: must be > 0",
            "gateway.workers: 5000 is more than 1024 (0 means one per CPU)",
        ]
    );
    let p = problems("backends:\n  - {name: a, url: \"http://x\", timeouts: {idle: 1}}\n");
    assert!(p[0].contains("unknown field `idle`"), "{p:?}");
}

#[tokio::test]
async fn the_gateway_refuses_what_it_cannot_serve() {
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    for (yaml, want) in [
        ("backends: []\n", "at least one backend"),
        (
            "backends:\n  - {name: a, url: \"https://example.com\"}\n",
            "https backends are not supported",
        ),
        (
            "backends:\n  - {name: a, url: \"http://127.0.0.1:1\", headers: {\"bad name\": x}}\n",
            "not a valid header name",
        ),
    ] {
        let c = Config::from_yaml(yaml, Path::new(".")).unwrap();
        let e = Gateway::start(c, any, GatewayOptions::default()).await.expect_err(yaml);
        assert!(e.contains(want), "{e}");
    }
}
