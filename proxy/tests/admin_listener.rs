//! The admin listener (docs/adr/038): `/admin/*` and `/metrics` are served
//! on `admin.listen`, not on the public listener (unless
//! `admin.on_public_listener`), and an example or short admin token is
//! refused when the admin endpoints would be reachable off loopback.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use common::*;
use hyper::Method;
use llmproxy_core::Config;
use llmproxy_server::{Gateway, GatewayOptions};
use serde_json::json;

fn yaml(url: &str, admin: &str) -> String {
    format!("backends:\n{}admin: {admin}\n", backend("m", url))
}

async fn reload(base: &str, token: &str) -> Reply {
    send(
        Method::POST,
        &format!("{base}/admin/reload"),
        &[("authorization", &format!("Bearer {token}"))],
        Bytes::new(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_metrics_leave_the_public_listener() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(&m.url(), "{token: adm-local, listen: '127.0.0.1:0'}")).await;
    assert_ne!(gw.base, gw.admin_base);
    // Public listener: the API and /healthz, no /metrics, no /admin.
    assert_eq!(get(&format!("{}/healthz", gw.base)).await.status, 200);
    assert_eq!(gw.chat(None, json!({})).await.status, 200);
    for r in [
        get(&format!("{}/metrics", gw.base)).await,
        reload(&gw.base, "adm-local").await,
    ] {
        assert_eq!(r.status, 404);
        assert_eq!(r.json()["error"]["code"], "not_found", "{}", r.json());
    }
    // Admin listener: /metrics, /healthz and /admin/reload, nothing else.
    let metrics = get(&format!("{}/metrics", gw.admin_base)).await;
    assert_eq!(metrics.status, 200);
    assert!(String::from_utf8_lossy(&metrics.body).contains("llmproxy_requests_total"));
    assert_eq!(get(&format!("{}/healthz", gw.admin_base)).await.status, 200);
    // Started from YAML text (no file): the reload itself is rejected, but
    // only after the token check passed.
    assert_eq!(reload(&gw.admin_base, "wrong").await.status, 401);
    assert_eq!(reload(&gw.admin_base, "adm-local").await.status, 422);
    let r = post(
        &format!("{}/v1/chat/completions", gw.admin_base),
        &chat("gpt-4", json!({})),
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_public_listener_keeps_the_old_layout() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(&m.url(), "{token: adm-local, on_public_listener: true}")).await;
    assert_eq!(gw.gateway.admin_addr(), None);
    assert_eq!(get(&format!("{}/metrics", gw.base)).await.status, 200);
    assert_eq!(reload(&gw.base, "wrong").await.status, 401);
    assert_eq!(gw.chat(None, json!({})).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_admin_tokens_are_refused_off_loopback() {
    let m = mock("m", |_| {}).await;
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    // (public listen, admin section, refused). The refusals happen before
    // anything binds, so no test listens off loopback.
    let cases = [
        (lo, "{token: change-me-admin-token, listen: '0.0.0.0:0'}", true),
        (lo, "{token: change-me, listen: '[::]:0'}", true),
        (lo, "{token: short-token, listen: '0.0.0.0:0'}", true),
        (any, "{token: change-me-admin-token, on_public_listener: true}", true),
        (lo, "{token: change-me-admin-token, listen: '127.0.0.1:0'}", false),
        (lo, "{token: change-me-admin-token, on_public_listener: true}", false),
    ];
    for (public, admin, refused) in cases {
        let config = Config::from_yaml(&yaml(&m.url(), admin), Path::new(".")).unwrap();
        match Gateway::start(config, public, GatewayOptions::default()).await {
            Ok(g) => {
                assert!(!refused, "{admin} on {public} started");
                g.shutdown(std::time::Duration::from_secs(5)).await;
            }
            Err(e) => {
                assert!(refused, "{admin} on {public}: {e}");
                assert!(e.starts_with("admin.token: "), "{e}");
                assert!(e.contains("not a loopback address"), "{e}");
            }
        }
    }
}

#[test]
fn serve_refuses_the_example_token_on_a_public_admin_listener() {
    let dir = std::env::temp_dir().join(format!("llmproxy-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        "backends:\n  - {name: m, url: 'http://127.0.0.1:9'}\nadmin: {token: change-me-admin-token}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("admin.token: 'change-me-admin-token' is an example token"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_the_token_policy_when_admin_is_exposed() {
    use llmproxy_server::gateway::reload::{Outcome, Trigger};
    use llmproxy_server::gateway::Shared;
    let m = mock("m", |_| {}).await;
    let dir = std::env::temp_dir().join(format!("llmproxy-admin-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    let write = |token: &str| std::fs::write(&path, yaml(&m.url(), &format!("{{token: {token}}}"))).unwrap();
    write("9f86d081884c7d659a2feaa0c55ad015");
    // The state of a gateway whose admin listener is off loopback; no
    // listener is bound (tests listen on 127.0.0.1 only).
    let mut shared = Shared::new(Config::from_file(&path).unwrap(), GatewayOptions::default()).unwrap();
    shared.admin_exposed = Some("0.0.0.0:8001".parse().unwrap());
    let shared = std::sync::Arc::new(shared);
    write("change-me-admin-token");
    match shared.reload(Trigger::Admin).await {
        Outcome::Rejected { problems } => {
            assert!(
                problems[0].starts_with("admin.token: 'change-me-admin-token'"),
                "{problems:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(shared.live().generation, 1);
    write("another-random-token-0123456789");
    assert!(matches!(
        shared.reload(Trigger::Admin).await,
        Outcome::Applied { generation: 2, .. }
    ));
}
