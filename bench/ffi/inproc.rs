//! In-process baseline for `make bench-ffi`: the cost of one routing call
//! made from Rust, to compare with the same call through the C ABI
//! (`bench_c.c`) and the LuaJIT module (`bench_lua.lua`).
//!
//! Script: conformance case 001 (the seed's routing example). Input:
//! `bench/ffi/routing-input-10k.json` (a request with a ~10 KB body).
//! Prints the median and p99 of 100k individually timed calls for:
//! - `route(typed)`: `Engine::route` with the request (body parsed once,
//!   shared in an `Arc`) and backends built once: what the Rust gateway
//!   pays per hook call, and what `make bench-core` measures; the baseline
//!   of the C ABI's prepared path;
//! - `run_parts`: `Engine::run_parts` with the same prebuilt request and the
//!   backends as a prebuilt JSON map: the core call under
//!   `llmp_engine_run_prepared`, without the C boundary;
//! - `run_json(value)`: the generic JSON entry point, input already parsed;
//! - `parse`: `serde_json::from_slice` of the input text alone;
//! - `parse+run_json`: parse the JSON text, then run (the work the C ABI
//!   does on every call).
//!
//! Built as an example of `ffi/` (module mode, system LuaJIT) so that all
//! three measurements use the same LuaJIT: `cargo run --release
//! --manifest-path ffi/Cargo.toml --example bench-inproc -- ROOT [N]`.

use std::time::Instant;

use llmproxy_core::conformance::Case;
use llmproxy_core::convert::Limits;
use llmproxy_core::engine::HookGlobals;
use llmproxy_core::hooks::{BackendStatus, RequestInfo, RouteDecision, RoutingInput};
use llmproxy_core::{Config, Engine, HookName};
use serde_json::Value;

fn median_p99(mut ns: Vec<u64>) -> (u64, u64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 - 1.0) * q) as usize];
    (at(0.5), at(0.99))
}

fn bench(name: &str, n: usize, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f();
    }
    let mut ns = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f();
        ns.push(t.elapsed().as_nanos() as u64);
    }
    let total = start.elapsed();
    let (median, p99) = median_p99(ns);
    println!(
        "rust  {name:<16} calls={n} median_ns={median} p99_ns={p99} mean_ns={}",
        total.as_nanos() / n as u128
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let root = args.next().unwrap_or_else(|| String::from("."));
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100_000);

    let case_text = std::fs::read_to_string(format!("{root}/conformance/cases/001-seed-routing-viplevel-3.json"))?;
    let case: Case = serde_json::from_str(&case_text)?;
    let input_text = std::fs::read_to_string(format!("{root}/bench/ffi/routing-input-10k.json"))?;
    let input: Value = serde_json::from_str(&input_text)?;

    let config = Config::single_hook(HookName::Routing, "scripts.routing", &case.source(), Default::default());
    let engine = Engine::new(config)?;
    let expect = Value::from("ultra");
    assert_eq!(engine.run_json(HookName::Routing, &input)?, expect);

    let request = RequestInfo::from_json(&input["request"], Limits::default())?;
    let mut backends = Vec::new();
    for (name, b) in input["backends"].as_object().into_iter().flatten() {
        let mut b = b.clone();
        b["name"] = Value::from(name.as_str());
        backends.push(serde_json::from_value::<BackendStatus>(b)?);
    }
    let typed = RoutingInput {
        request: &request,
        backends: &backends,
    };
    bench("route(typed)", n, || {
        let out = engine.route(&typed);
        assert!(matches!(out, Ok(RouteDecision::Backend(ref b)) if b == "ultra"));
    });
    let globals = HookGlobals::new(
        input
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    bench("run_parts", n, || {
        let out = engine.run_parts(HookName::Routing, Some(&request), None, &globals);
        assert!(matches!(out, Ok(ref v) if *v == expect));
    });
    bench("run_json(value)", n, || {
        let out = engine.run_json(HookName::Routing, &input);
        assert!(matches!(out, Ok(ref v) if *v == expect));
    });
    bench("parse", n, || {
        let value: Value = serde_json::from_slice(input_text.as_bytes()).unwrap_or(Value::Null);
        assert!(value.is_object());
    });
    bench("parse+run_json", n, || {
        let value: Value = serde_json::from_slice(input_text.as_bytes()).unwrap_or(Value::Null);
        let out = engine.run_json(HookName::Routing, &value);
        assert!(matches!(out, Ok(ref v) if *v == expect));
    });
    Ok(())
}
