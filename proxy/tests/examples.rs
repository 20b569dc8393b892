//! The shipped example config (`examples/llmproxy.yaml`, used by the README
//! and `nginx-conf/nginx.conf`) serves the documented requests: only its
//! backend addresses are pointed at this test's mock backends.

mod common;

use std::path::PathBuf;

use common::*;
use llmproxy_core::Config;
use serde_json::json;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[tokio::test]
async fn the_example_config_serves_the_documented_requests() {
    let mut yaml = std::fs::read_to_string(examples_dir().join("llmproxy.yaml")).unwrap();
    let mut mocks = Vec::new();
    for (port, name) in [(9001, "standard"), (9002, "high-performance"), (9003, "ultra")] {
        let m = mock(name, |_| {}).await;
        let from = format!("\"http://127.0.0.1:{port}\"");
        assert!(yaml.contains(&from), "examples/llmproxy.yaml no longer has {from}");
        yaml = yaml.replace(&from, &format!("\"{}\"", m.url()));
        mocks.push(m);
    }
    let config = Config::from_yaml(&yaml, &examples_dir()).expect("examples/llmproxy.yaml loads");
    let gw = TestGateway::start_config(config).await;
    let url = format!("{}/v1/chat/completions", gw.base);

    struct Case {
        key: Option<&'static str>,
        model: &'static str,
        viplevel: u64,
        status: u16,
        backend: Option<&'static str>,
        message: Option<&'static str>,
    }
    let case = |key, model, viplevel, status, backend, message| Case {
        key,
        model,
        viplevel,
        status,
        backend,
        message,
    };
    let cases = [
        case(None, "gpt-4", 3, 401, None, None),
        case(Some("sk-nope"), "gpt-4", 3, 401, None, None),
        case(Some("sk-example-vip"), "gpt-4", 3, 200, Some("ultra"), None),
        case(
            Some("sk-example-basic"),
            "gpt-3.5",
            1,
            200,
            Some("high-performance"),
            None,
        ),
        case(Some("sk-example-basic"), "gpt-4", 0, 403, None, Some("未知错误")),
    ];
    for Case {
        key,
        model,
        viplevel,
        status,
        backend,
        message,
    } in cases
    {
        let auth: Vec<(&'static str, String)> = key.map(bearer).into_iter().collect();
        let r = post(&url, &chat(model, json!({"viplevel": viplevel})), &hdrs(&auth)).await;
        assert_eq!(r.status, status, "{key:?} {model}: {}", r.json());
        if let Some(b) = backend {
            assert_eq!(r.backend(), Some(b), "{key:?} {model}");
            assert_eq!(r.json()["model"], json!(model), "the client's model comes back");
        }
        if let Some(m) = message {
            assert_eq!(
                r.json()["error"]["message"],
                json!(m),
                "{key:?} {model}: the seed's error_handler"
            );
        }
    }
}
