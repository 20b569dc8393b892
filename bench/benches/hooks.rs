//! In-process hook benchmarks (criterion).
//!
//! - `body_parse/*`: the one-time JSON parse of a request body.
//! - `routing/sandboxed/*`: the seed's routing script through the engine
//!   (pool checkout, fresh environment, lazy body, limits, output checks).
//! - `routing/unsandboxed_eager/*`: the same script in a plain LuaJIT state
//!   (JIT on, no limits), the request table built per call with the body
//!   converted eagerly: what a straightforward embedding does.
//! - `routing/unsandboxed_bare/*`: the same script with its globals built
//!   once: the cost of running the script alone, the floor.
//! - `input_build/*`: building the request table with and without an mlua
//!   memory limit set (mlua protects every API call while a limit is set).
//! - `compute/*`: a compute-bound script (a byte loop over the text of 200
//!   messages, ~200 KB) sandboxed (`jit` or `interpreted`, as the process
//!   runs sandbox VMs: `LLMPROXY_SANDBOX_JIT=sandbox` for the latter, where
//!   scripts run interpreted as under nginx) and as the
//!   same function in a plain LuaJIT state with the JIT compiler on and off,
//!   its input built once.
//!
//! - `pipeline/*`: the seed's data-path scripts (request_transform,
//!   response_transform, usage) and admission scripts (auth, rate_limit,
//!   with a key's full record as `key_info`) through the engine;
//!   request_transform also on 10 KB and 1 MB chat bodies (it copies the
//!   body, so its cost grows with it).
//! - `answer/usage_only/*`: a backend's answer through the request handle
//!   of a billing-only configuration (the seed's usage script, no
//!   response_transform): usage read from the answer, the script run, the
//!   charge computed. The script does not read `response.body`, so the
//!   answer is never parsed (compare `body_parse/*`).
//!
//! The process allocates through mimalloc, as every host does (the
//! gateway, the C library and the rock link it; docs/adr/014-allocator.md):
//! a hook call allocates in its VM and in Rust, so glibc's malloc would
//! measure a cost no host pays. The baseline rows use the same allocator.
//!
//! Run with `make bench-core`, which also writes docs/benchmarks.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use llmproxy_bench::{chat_body, SEED_ROUTING};
use llmproxy_core::config::ScriptLimits;
use llmproxy_core::hooks::{BackendStatus, RequestInfo, RouteDecision, RoutingInput};
use llmproxy_core::{Config, Engine, HookName};
use mlua::{Lua, Table, Value as LuaValue};
use serde_json::Value;

/// The hosts' allocator (see the module's doc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SIZES: [(&str, usize); 2] = [("10KB", 10 << 10), ("1MB", 1 << 20)];

fn backends() -> Vec<BackendStatus> {
    ["standard", "high-performance", "ultra"]
        .iter()
        .enumerate()
        .map(|(i, name)| BackendStatus {
            name: (*name).to_owned(),
            url: format!("http://127.0.0.1:{}", 9000 + i),
            healthy: true,
            weight: 10,
            latency_ms: 80.0 + i as f64,
            active_connections: i as u64,
        })
        .collect()
}

fn request(body: Arc<Value>) -> RequestInfo {
    RequestInfo {
        id: "req_abc123".into(),
        body,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("user-agent".into(), "bench".into()),
        ],
        user_id: Some("user_001".into()),
        api_key: Some("sk-xxx".into()),
        client_ip: Some("127.0.0.1".into()),
        path: Some("/v1/chat/completions".into()),
        ..RequestInfo::default()
    }
}

/// Plain eager JSON -> Lua conversion, as an unsandboxed embedding would do.
fn to_lua_plain(lua: &Lua, v: &Value) -> mlua::Result<LuaValue> {
    Ok(match v {
        Value::Null => LuaValue::Nil,
        Value::Bool(b) => LuaValue::Boolean(*b),
        Value::Number(n) => LuaValue::Number(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => LuaValue::String(lua.create_string(s)?),
        Value::Array(a) => {
            let t = lua.create_table_with_capacity(a.len(), 0)?;
            for (i, x) in a.iter().enumerate() {
                t.raw_set(i + 1, to_lua_plain(lua, x)?)?;
            }
            LuaValue::Table(t)
        }
        Value::Object(o) => {
            let t = lua.create_table_with_capacity(0, o.len())?;
            for (k, x) in o {
                t.raw_set(k.as_str(), to_lua_plain(lua, x)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

fn plain_request(lua: &Lua, req: &RequestInfo, body: LuaValue) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("id", req.id.as_str())?;
    t.raw_set("body", body)?;
    let h = lua.create_table()?;
    for (k, v) in &req.headers {
        h.raw_set(k.as_str(), v.as_str())?;
    }
    t.raw_set("headers", h)?;
    t.raw_set("user_id", req.user_id.as_deref())?;
    t.raw_set("api_key", req.api_key.as_deref())?;
    t.raw_set("client_ip", req.client_ip.as_deref())?;
    t.raw_set("path", req.path.as_deref())?;
    Ok(t)
}

fn plain_backends(lua: &Lua, backends: &[BackendStatus]) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for b in backends {
        let e = lua.create_table()?;
        e.raw_set("url", b.url.as_str())?;
        e.raw_set("healthy", b.healthy)?;
        e.raw_set("weight", b.weight)?;
        e.raw_set("latency_ms", b.latency_ms)?;
        e.raw_set("active_connections", b.active_connections)?;
        t.raw_set(b.name.as_str(), e)?;
    }
    Ok(t)
}

fn bench_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("body_parse");
    for (label, size) in SIZES {
        let text = serde_json::to_vec(&chat_body(size)).expect("serializes");
        g.bench_with_input(BenchmarkId::from_parameter(label), &text, |b, text| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(text)).expect("parses"))
        });
    }
    g.finish();
}

fn bench_routing(c: &mut Criterion) {
    let backends = backends();
    let engine = Engine::new(Config::single_hook(
        HookName::Routing,
        "seed-routing",
        SEED_ROUTING,
        ScriptLimits::default(),
    ))
    .expect("engine");
    let mut g = c.benchmark_group("routing");
    // The sandboxed cases run first: the eager 1 MB baseline leaves the
    // process allocator fragmented, which slows whatever runs after it.
    for (label, size) in SIZES {
        let req = request(Arc::new(chat_body(size)));
        g.bench_function(BenchmarkId::new("sandboxed", label), |b| {
            b.iter(|| {
                let d = engine
                    .route(&RoutingInput {
                        request: black_box(&req),
                        backends: &backends,
                    })
                    .expect("routes");
                assert_eq!(d, RouteDecision::Backend("ultra".into()));
            })
        });
    }
    for (label, size) in SIZES {
        let req = request(Arc::new(chat_body(size)));
        let lua = Lua::new();
        let f = lua.load(SEED_ROUTING).into_function().expect("compiles");
        g.bench_function(BenchmarkId::new("unsandboxed_eager", label), |b| {
            b.iter(|| {
                let body = to_lua_plain(&lua, black_box(&req.body)).expect("converts");
                let g = lua.globals();
                g.raw_set("request", plain_request(&lua, &req, body).expect("request"))
                    .expect("set");
                g.raw_set("backends", plain_backends(&lua, &backends).expect("backends"))
                    .expect("set");
                let r: String = f.call(()).expect("runs");
                assert_eq!(r, "ultra");
            })
        });

        let body = to_lua_plain(&lua, &req.body).expect("converts");
        lua.globals()
            .raw_set("request", plain_request(&lua, &req, body).expect("request"))
            .expect("set");
        lua.globals()
            .raw_set("backends", plain_backends(&lua, &backends).expect("backends"))
            .expect("set");
        g.bench_function(BenchmarkId::new("unsandboxed_bare", label), |b| {
            b.iter(|| {
                let r: String = f.call(()).expect("runs");
                assert_eq!(r, "ultra");
            })
        });
    }
    g.finish();
}

/// Loops and string work over every message: what a token estimate or a
/// content filter does.
const COMPUTE: &str = r#"
local messages = request.body.messages
local score, upper, spaces = 0, 0, 0
for i = 1, #messages do
    local text = messages[i].content
    for j = 1, #text do
        local b = string.byte(text, j)
        if b == 32 then
            spaces = spaces + 1
        elseif b >= 65 and b <= 90 then
            upper = upper + 1
        end
        score = (score * 31 + b) % 1000000007
    end
end
return {score = score, upper = upper, spaces = spaces}
"#;

fn bench_compute(c: &mut Criterion) {
    let body = chat_body(200 * 1039);
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(200));
    let engine = Engine::new(Config::single_hook(
        HookName::Usage,
        "compute",
        COMPUTE,
        ScriptLimits::default(),
    ))
    .expect("engine");
    let input = serde_json::json!({"request": {"id": "req_abc123", "body": body}});
    let mut g = c.benchmark_group("compute");
    let mode = if llmproxy_core::sandbox::jit::enabled() {
        "jit"
    } else {
        "interpreted"
    };
    let expected = engine.run_json(HookName::Usage, &input).expect("runs");
    g.bench_function(BenchmarkId::new("sandboxed", mode), |b| {
        b.iter(|| {
            let r = engine.run_json(HookName::Usage, black_box(&input)).expect("runs");
            assert_eq!(r["score"], expected["score"]);
        })
    });
    for (label, jit) in [("jit", "jit.on()"), ("interpreted", "jit.off() jit.flush()")] {
        let lua = Lua::new();
        lua.load(jit).exec().expect("jit mode");
        let f = lua.load(COMPUTE).into_function().expect("compiles");
        let request = lua.create_table().expect("table");
        request
            .raw_set("body", to_lua_plain(&lua, &input["request"]["body"]).expect("converts"))
            .expect("set");
        lua.globals().raw_set("request", request).expect("set");
        g.bench_function(BenchmarkId::new("plain", label), |b| {
            b.iter(|| {
                let r: Table = f.call(()).expect("runs");
                assert_eq!(r.raw_get::<f64>("score").ok(), expected["score"].as_f64());
            })
        });
    }
    g.finish();
}

fn bench_memory_limit(c: &mut Criterion) {
    let req = request(Arc::new(chat_body(10 << 10)));
    let backends = backends();
    let mut g = c.benchmark_group("input_build");
    for (label, limit) in [("limit_off", 0usize), ("limit_on", 64 << 20)] {
        let lua = Lua::new();
        lua.set_memory_limit(limit).expect("limit");
        g.bench_function(label, |b| {
            b.iter(|| {
                let body = LuaValue::Nil;
                let t = plain_request(&lua, black_box(&req), body).expect("request");
                let bk = plain_backends(&lua, &backends).expect("backends");
                black_box((t, bk));
            })
        });
    }
    g.finish();
}

/// The seed's transform and usage scripts on a small chat request, as the
/// gateway runs them on every request.
fn bench_pipeline_hooks(c: &mut Criterion) {
    use llmproxy_core::hooks::{
        RequestTransformInput, ResponseInfo, ResponseTransformInput, UsageInput, UsageMetadata,
    };
    let engine = seed_engine(&["request_transform", "response_transform", "usage"]);
    let body: Value = serde_json::from_str(
        r#"{"model":"gpt-4","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello to the benchmark, please."}],"temperature":0.7,"viplevel":3}"#,
    )
    .expect("body");
    let mut req = request(Arc::new(body));
    req.backend_url = Some("http://127.0.0.1:9000".into());
    let response = ResponseInfo {
        status_code: 200,
        body: serde_json::from_str::<serde_json::Value>(r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"llama-3-70b-instruct","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock backend, friend."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":8,"total_tokens":28}}"#)
                .expect("response")
                .into(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        is_stream: false,
    };
    let usage = serde_json::json!({"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28});
    let metadata = UsageMetadata {
        backend_url: "http://127.0.0.1:9000".into(),
        latency_ms: 1.0,
        is_stream: false,
    };
    let mut g = c.benchmark_group("pipeline");
    g.bench_function("request_transform", |b| {
        b.iter(|| {
            engine
                .transform_request(&RequestTransformInput {
                    request: black_box(&req),
                })
                .expect("ok")
        })
    });
    for (label, size) in SIZES {
        let mut sized = request(Arc::new(chat_body(size)));
        sized.backend_url = Some("http://127.0.0.1:9000".into());
        g.bench_function(BenchmarkId::new("request_transform", label), |b| {
            b.iter(|| {
                engine
                    .transform_request(&RequestTransformInput {
                        request: black_box(&sized),
                    })
                    .expect("ok")
            })
        });
    }
    g.bench_function("response_transform", |b| {
        b.iter(|| {
            engine
                .transform_response(&ResponseTransformInput {
                    request: &req,
                    response: black_box(&response),
                    backend_url: "http://127.0.0.1:9000",
                    latency_ms: 1.0,
                })
                .expect("ok")
        })
    });
    g.bench_function("usage", |b| {
        b.iter(|| {
            engine
                .usage(&UsageInput {
                    request: &req,
                    usage: &usage,
                    response: &response,
                    metadata: &metadata,
                })
                .expect("ok")
        })
    });
    g.finish();
}

/// A completion of about `size` bytes: choices of ~1 KB of text each.
fn completion(size: usize) -> Vec<u8> {
    let text = "All work and no play makes a long answer. ".repeat(24);
    let choices: Vec<Value> = (0..(size / 1100).max(1))
        .map(|i| serde_json::json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "llama-3-70b-instruct",
        "choices": choices, "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
    }))
    .expect("serializes")
}

fn bench_answer(c: &mut Criterion) {
    use criterion::BatchSize;
    use llmproxy_core::http::api::Api;
    use llmproxy_core::request_handle::{RequestHandle, Step};
    let engine = seed_engine(&["usage"]);
    let req = request(Arc::new(
        serde_json::json!({"model": "gpt-4", "viplevel": 3, "messages": [{"role": "user", "content": "hi"}]}),
    ));
    let mut g = c.benchmark_group("answer");
    for (label, size) in SIZES {
        let answer = completion(size);
        g.bench_with_input(BenchmarkId::new("usage_only", label), &answer, |b, answer| {
            b.iter_batched(
                || {
                    let mut h = RequestHandle::new(req.clone(), Some(Api::ChatCompletions));
                    let _ = h.upstream(&engine, "http://127.0.0.1:9000");
                    h
                },
                |mut h| {
                    let _ = h.respond(&engine, 200, Vec::new(), black_box(answer), 1.0);
                    match h.usage(&engine) {
                        Step::Ran(billing) => billing,
                        other => panic!("usage: {other:?}"),
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// `pipeline/auth` and `pipeline/rate_limit`: the seed's admission scripts
/// with a key's full record as `key_info` (the scripts read three fields).
fn bench_admission_hooks(c: &mut Criterion) {
    use llmproxy_core::hooks::{AuthInput, CurrentTime, KeyInfo, RateLimitInput, RateLimitStatus, StandardChecks};
    let engine = seed_engine(&["auth", "rate_limit"]);
    let req = request(Arc::new(
        serde_json::json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "viplevel": 3}),
    ));
    let key_info = serde_json::json!({
        "key_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "user_id": "user_001", "name": "bench", "status": "active",
        "total_quota": 1_000_000_000_000u64, "used_quota": 50_000,
        "allowed_ips": ["10.0.0.0/8", "192.168.1.0/24"], "expires_at": "2030-12-31T23:59:59Z",
        "allowed_models": ["gpt-4", "gpt-3.5-turbo"], "viplevel": 3
    });
    let checks = StandardChecks {
        key_valid: true,
        status_active: true,
        not_expired: true,
        ip_allowed: true,
        quota_available: true,
    };
    let status = RateLimitStatus {
        global_remaining: 1000,
        key_remaining: 100,
        concurrent_count: 1,
    };
    let now = CurrentTime {
        hour: 15,
        weekday: 3,
        timestamp: 1_796_400_000,
    };
    let mut g = c.benchmark_group("pipeline");
    g.bench_function("auth", |b| {
        b.iter(|| {
            engine
                .auth(&AuthInput {
                    request: &req,
                    key_info: KeyInfo::live(black_box(&key_info), 50_000),
                    standard_checks: checks,
                })
                .expect("ok")
        })
    });
    g.bench_function("rate_limit", |b| {
        b.iter(|| {
            engine
                .rate_limit(&RateLimitInput {
                    request: &req,
                    key_info: KeyInfo::live(black_box(&key_info), 50_000),
                    rate_limit_status: status,
                    current_time: now,
                })
                .expect("ok")
        })
    });
    g.finish();
}

/// `pipeline/error_handler`: the seed's error handler on an upstream
/// failure (it reads the error's type and the request id, and returns a
/// status and a nested body).
fn bench_error_handler(c: &mut Criterion) {
    use llmproxy_core::hooks::{ErrorInfo, ErrorInput};
    let engine = seed_engine(&["error_handler"]);
    let req = request(Arc::new(
        serde_json::json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "viplevel": 3}),
    ));
    let error = ErrorInfo {
        kind: "backend_error".into(),
        message: "the backend answered 502".into(),
        status_code: 502,
        backend_url: Some("http://127.0.0.1:9000".into()),
        retry_count: 1,
    };
    let mut g = c.benchmark_group("pipeline");
    g.bench_function("error_handler", |b| {
        b.iter(|| {
            engine
                .handle_error(&ErrorInput {
                    request: &req,
                    error: black_box(&error),
                })
                .expect("ok")
        })
    });
    g.finish();
}

/// An engine running the seed's script (`examples/scripts/<hook>.lua`) for
/// each of `hooks`.
fn seed_engine(hooks: &[&str]) -> Engine {
    let mut yaml = String::from("scripts:\n");
    for hook in hooks {
        let path = format!("{}/../examples/scripts/{hook}.lua", env!("CARGO_MANIFEST_DIR"));
        let script = std::fs::read_to_string(path).expect("script");
        yaml.push_str(&format!("  {hook}:\n    script: |\n"));
        for line in script.lines() {
            yaml.push_str(&format!("      {line}\n"));
        }
    }
    Engine::new(Config::from_yaml(&yaml, std::path::Path::new(".")).expect("config")).expect("engine")
}

criterion_group!(
    benches,
    bench_parse,
    bench_routing,
    bench_memory_limit,
    bench_pipeline_hooks,
    bench_admission_hooks,
    bench_error_handler,
    bench_answer,
    bench_compute
);
criterion_main!(benches);
