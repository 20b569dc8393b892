//! The HTTP conformance suite (`conformance/http.json`) against the
//! standalone gateway: real mock backends, real sockets. nginx runs the
//! same cases (`t/020-http-conformance.t`).

mod common;

use bytes::Bytes;
use common::{mock, refused_url, send, TestGateway};
use hyper::Method;
use regex::Regex;
use serde_json::{json, Value};

/// The ledger rows of `db`, oldest first, as `llmproxy usage --records`
/// prints them (the reader both hosts' tests use).
fn ledger_rows(db: &std::path::Path) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(["usage", "--records", "--db"])
        .arg(db)
        .output()
        .expect("llmproxy usage");
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Every failure of one case, as lines.
async fn run_case(case: &Value, index: usize) -> Vec<String> {
    let name = case["name"].as_str().unwrap_or("?");
    let mut failures = Vec::new();
    let mut mocks = Vec::new();
    let mut backends = Vec::new();
    let names: Vec<&str> = match case["backends"].as_array() {
        Some(list) => list.iter().filter_map(Value::as_str).collect(),
        None => vec!["standard"],
    };
    for b in names {
        let url = if b == "unreachable" {
            refused_url()
        } else {
            let m = mock(b, |_| {}).await;
            let url = format!("http://{}", m.local_addr());
            mocks.push(m);
            url
        };
        backends.push(json!({"name": b, "url": url}));
    }
    let mut config = case["config"].clone();
    config["backends"] = Value::Array(backends);
    let ledger = case["ledger"].as_array();
    let db = common::tempdir(&format!("http-case-{index}")).join("usage.db");
    if ledger.is_some() {
        config["ledger"] = json!({"path": db, "flush_ms": 10});
    }
    let gw = TestGateway::start(&config.to_string()).await;
    let samples: Vec<&String> = case["metrics"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let mut before = Vec::new();
    for s in &samples {
        before.push(gw.metric(s).await);
    }
    for (i, req) in case["requests"].as_array().into_iter().flatten().enumerate() {
        let at = format!("{name}: request {}", i + 1);
        if let Some(ms) = req["wait_ms"].as_u64() {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let method = Method::from_bytes(req["method"].as_str().unwrap_or("POST").as_bytes()).expect("method");
        let pad = |what: &str| req["pad"][what].as_u64().map(|n| "a".repeat(n as usize));
        let path = req["path"].as_str().unwrap_or("/v1/chat/completions");
        let path = match pad("query") {
            Some(q) => format!("{path}?pad={q}"),
            None => path.to_owned(),
        };
        // A list value: the header sent once per value.
        let mut headers: Vec<(String, String)> = req["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(k, v)| {
                let values = match v {
                    Value::Array(list) => list.iter().collect(),
                    one => vec![one],
                };
                values
                    .into_iter()
                    .map(|v| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            })
            .collect();
        if let Some(k) = req["key"].as_str() {
            headers.push(("authorization".into(), format!("Bearer {k}")));
        }
        if let Some(v) = pad("header") {
            headers.push(("x-pad".into(), v));
        }
        let body = match (&req["raw"], &req["body"]) {
            (Value::String(raw), _) => Bytes::from(raw.clone()),
            (_, Value::Null) if method == Method::GET => Bytes::new(),
            (_, Value::Null) => {
                Bytes::from(json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}).to_string())
            }
            (_, b) => Bytes::from(b.to_string()),
        };
        if !body.is_empty() {
            headers.push(("content-type".into(), "application/json".into()));
        }
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = send(method, &format!("{}{path}", gw.base), &h, body).await;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let e = &req["expect"];
        failures.extend(malformed(e).map(|m| format!("{at}: the case is malformed: {m}")));
        if let Some(want) = e["status"].as_u64() {
            if u64::from(r.status) != want {
                failures.push(format!("{at}: status {} != {want}; body {text}", r.status));
            }
        }
        if let Some(ptrs) = e["json"].as_object() {
            let got: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            for (ptr, want) in ptrs {
                if got.pointer(ptr) != Some(want) {
                    failures.push(format!(
                        "{at}: {ptr} is {:?}, not {want}; body {text}",
                        got.pointer(ptr)
                    ));
                }
            }
        }
        for (hname, pattern) in e["headers"].as_object().into_iter().flatten() {
            let re = Regex::new(pattern.as_str().unwrap_or_default()).expect("header regex");
            match r.header(hname) {
                Some(v) if re.is_match(v) => {}
                other => failures.push(format!("{at}: header {hname} is {other:?}, not /{re}/")),
            }
        }
        for (hname, want) in e["header_values"].as_object().into_iter().flatten() {
            let got: Vec<&str> = r
                .headers
                .get_all(hname.as_str())
                .iter()
                .map(|v| v.to_str().unwrap_or("(not text)"))
                .collect();
            let want: Vec<&str> = want
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if got != want {
                failures.push(format!("{at}: header {hname} came as {got:?}, not {want:?}"));
            }
        }
        for hname in e["no_headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if let Some(v) = r.header(hname) {
                failures.push(format!("{at}: header {hname} should be absent, is {v}"));
            }
        }
        for s in e["body_contains"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !text.contains(s) {
                failures.push(format!("{at}: body lacks {s}: {text}"));
            }
        }
        for s in e["body_lacks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if text.contains(s) {
                failures.push(format!("{at}: body has {s}: {text}"));
            }
        }
    }
    if !samples.is_empty() {
        // Counters of what happens after the response (usage) settle.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for (s, b) in samples.iter().zip(before) {
        let want = case["metrics"][s.as_str()].as_f64().unwrap_or(0.0);
        let got = gw.metric(s).await - b;
        if (got - want).abs() > 1e-9 {
            failures.push(format!("{name}: {s} rose by {got}, not {want}"));
        }
    }
    if let Some(want) = ledger {
        let mut rows = Vec::new();
        for _ in 0..100 {
            rows = ledger_rows(&db);
            if rows.len() >= want.len() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        if rows.len() != want.len() {
            failures.push(format!(
                "{name}: {} ledger rows, not {}: {rows:?}",
                rows.len(),
                want.len()
            ));
        }
        for (i, (got, want)) in rows.iter().zip(want).enumerate() {
            for (field, v) in want.as_object().into_iter().flatten() {
                if &got[field] != v {
                    failures.push(format!(
                        "{name}: ledger row {}: {field} is {}, not {v}",
                        i + 1,
                        got[field]
                    ));
                }
            }
        }
    }
    drop(mocks);
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_case_holds_on_the_gateway() {
    let text = include_str!("../../conformance/http.json");
    let doc: Value = serde_json::from_str(text).expect("http.json");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 15, "http.json has {} cases", cases.len());
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        if let Some(hosts) = case["hosts"].as_array() {
            if !hosts.iter().any(|h| h == "gateway") {
                eprintln!("not for the gateway: {} ({})", case["name"], case["why"]);
                continue;
            }
        }
        failures.extend(run_case(case, index).await);
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// What is wrong with an `expect` object (see the suite's `about`): an
/// expectation this runner would otherwise skip in silence.
fn malformed(e: &Value) -> Option<String> {
    let Some(map) = e.as_object() else {
        return Some(format!("expect is {e}, not an object"));
    };
    for (key, v) in map {
        let ok = match key.as_str() {
            "status" => v.is_u64(),
            "json" | "headers" => v.is_object(),
            "header_values" => v.as_object().is_some_and(|m| {
                m.values()
                    .all(|l| l.as_array().is_some_and(|a| a.iter().all(Value::is_string)))
            }),
            "no_headers" | "body_contains" | "body_lacks" => {
                v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
            }
            _ => false,
        };
        if !ok {
            return Some(format!("expect.{key} is {v}"));
        }
    }
    None
}
