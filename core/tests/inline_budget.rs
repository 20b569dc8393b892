//! Hook calls under an inline budget (`llmproxy_core::inline`, ADR 049):
//! a call within the budget is the same call; one past it stops at the
//! budget (compiled loops and `pcall` included), leaves no trace (no log
//! line, no failure logged) and sends its hook to the blocking path for a
//! while; the blocking path still gives the script its whole time limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmproxy_core::inline::{attempt, OverBudget, Overrun};
use llmproxy_core::{Config, Engine, HookName};
use serde_json::{json, Value};

const BUDGET: Duration = Duration::from_millis(1);

/// A usage script that logs a line, then (when asked) burns `ms`
/// milliseconds in the way `how` names.
const SCRIPT: &str = r#"
log.info("about to work")
local ms, how = request.body.ms or 0, request.body.how
local stop = time.now() + ms / 1000
if how == "loop" then
  local x = 0
  while time.now() < stop do for i = 1, 1000 do x = x + i end end
elseif how == "jit" then
  -- no calls in the loop: compiled by the JIT where it is on
  local x = 0
  for i = 1, ms * 1000000 do x = (x + i) % 7 end
elseif how == "pcall" then
  for _ = 1, 100 do
    pcall(function() while time.now() < stop do end end)
  end
elseif how == "strings" then
  local parts = {}
  while time.now() < stop do parts[#parts % 64 + 1] = string.rep("ab", 100):upper() end
end
return {ok = true, how = how}
"#;

fn engine() -> Engine {
    let yaml = format!(
        "scripts:\n  usage:\n    timeout_ms: 2000\n    script: |\n{}",
        SCRIPT.lines().map(|l| format!("      {l}\n")).collect::<String>()
    );
    Engine::new(Config::from_yaml(&yaml, std::path::Path::new(".")).expect("config")).expect("engine")
}

fn stopped(reason: Overrun) -> OverBudget {
    OverBudget {
        hook: HookName::Usage,
        reason,
    }
}

fn input(ms: u64, how: &str) -> Value {
    json!({"request": {"id": "r-1", "body": {"ms": ms, "how": how}}})
}

/// Counts the events a call logs, by target.
#[derive(Default)]
struct Lines {
    script: AtomicUsize,
    hook_failed: AtomicUsize,
}

impl tracing::Subscriber for Lines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        match event.metadata().target() {
            "llmproxy::script" => self.script.fetch_add(1, Ordering::SeqCst),
            "llmproxy::hook" => self.hook_failed.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Run `f` and count what it logs.
fn logged<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let lines = Arc::new(Lines::default());
    let out = tracing::subscriber::with_default(Arc::clone(&lines), f);
    (
        out,
        lines.script.load(Ordering::SeqCst),
        lines.hook_failed.load(Ordering::SeqCst),
    )
}

#[test]
fn a_call_within_the_budget_is_the_same_call_and_logs_its_lines() {
    let engine = engine();
    let direct = engine.run_json(HookName::Usage, &input(0, "none")).expect("direct");
    let (inline, script_lines, failures) =
        logged(|| attempt(BUDGET, || engine.run_json(HookName::Usage, &input(0, "none"))));
    assert_eq!(inline.expect("within budget").expect("call"), direct);
    assert_eq!((script_lines, failures), (1, 0));
}

#[test]
fn a_call_past_the_budget_stops_there_leaves_no_trace_and_goes_slow() {
    for how in ["loop", "jit", "pcall", "strings"] {
        let engine = engine();
        let started = Instant::now();
        let (r, script_lines, failures) =
            logged(|| attempt(BUDGET, || engine.run_json(HookName::Usage, &input(500, how))));
        let took = started.elapsed();
        assert_eq!(r.map(|_| ()), Err(stopped(Overrun::Budget)), "{how}");
        assert!(took < Duration::from_millis(100), "{how}: stopped after {took:?}");
        assert_eq!((script_lines, failures), (0, 0), "{how}: an overrun call logs nothing");

        // The blocking path runs the whole call under the script's own
        // time limit, and logs as usual.
        let (r, script_lines, _) = logged(|| engine.run_json(HookName::Usage, &input(20, how)));
        assert_eq!(r.expect("blocking call")["ok"], json!(true), "{how}");
        assert_eq!(script_lines, 1, "{how}");

        // That run was past the budget too: the hook is slow now, and an
        // attempt skips it at once, even for a fast input.
        let r = attempt(BUDGET, || engine.run_json(HookName::Usage, &input(0, "none")));
        assert_eq!(r.map(|_| ()), Err(stopped(Overrun::SlowHook)), "{how}");
    }
}

#[test]
fn an_overrun_whose_blocking_run_is_fast_leaves_the_hook_inline() {
    // As when the worker was preempted: the call overran, the same call on
    // the blocking path is fast, so the next attempt runs inline again.
    let engine = engine();
    let r = attempt(BUDGET, || engine.run_json(HookName::Usage, &input(500, "loop")));
    assert_eq!(r.map(|_| ()), Err(stopped(Overrun::Budget)));
    engine
        .run_json(HookName::Usage, &input(0, "none"))
        .expect("blocking call");
    let r = attempt(BUDGET, || engine.run_json(HookName::Usage, &input(0, "none")));
    assert!(matches!(r, Ok(Ok(_))), "{r:?}");
}

#[test]
fn every_call_of_a_job_after_an_overrun_is_skipped() {
    let engine = engine();
    let mut calls = 0;
    let r = attempt(BUDGET, || {
        for ms in [0, 500, 0] {
            calls += 1;
            let _ = engine.run_json(HookName::Usage, &input(ms, "loop"));
        }
    });
    assert_eq!(r, Err(stopped(Overrun::Budget)));
    assert_eq!(calls, 3);
    // The VM stopped by the budget was discarded; the others went back.
    let stats = engine.pool_stats();
    assert_eq!(stats.discarded, 1, "{stats:?}");
}

#[test]
fn an_inline_call_does_not_wait_for_a_busy_vm() {
    let yaml = format!(
        "scripts:\n  pool: {{size: 1}}\n  usage:\n    timeout_ms: 2000\n    script: |\n{}",
        SCRIPT.lines().map(|l| format!("      {l}\n")).collect::<String>()
    );
    let engine = Arc::new(Engine::new(Config::from_yaml(&yaml, std::path::Path::new(".")).unwrap()).unwrap());
    let busy = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || engine.run_json(HookName::Usage, &input(300, "loop")))
    };
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let r = attempt(BUDGET, || engine.run_json(HookName::Usage, &input(0, "none")));
    assert_eq!(r.map(|_| ()), Err(stopped(Overrun::NoIdleVm)));
    assert!(started.elapsed() < Duration::from_millis(100), "it waited");
    assert_eq!(busy.join().unwrap().expect("the busy call")["ok"], json!(true));
}
