//! The VM pool under concurrency: many threads, one engine, every answer
//! right, nothing leaking from one call into the next.

use std::sync::Arc;

use llmproxy_core::config::ScriptLimits;
use llmproxy_core::{Config, Engine, ErrorKind, HookName};
use serde_json::json;

const SCRIPT: &str = r#"
local n = request.body.n
local seen = leaked                      -- a global left by an earlier call?
leaked = n                               -- try to leave one for the next call
local string_seen = string.leaked        -- a library mutated by an earlier call?
pcall(function() string.leaked = n end)
return {n = n, double = n * 2, seen = seen, string_seen = string_seen}
"#;

#[test]
fn eight_threads_times_ten_thousand_calls_are_correct_and_isolated() {
    let engine = Arc::new(
        Engine::new(Config::single_hook(
            HookName::Usage,
            "pool",
            SCRIPT,
            ScriptLimits::default(),
        ))
        .unwrap(),
    );
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                for i in 0..10_000u64 {
                    let n = t * 1_000_000 + i;
                    let input = json!({"request": {"id": format!("r{n}"), "body": {"n": n}}});
                    let got = engine.run_json(HookName::Usage, &input).expect("call succeeds");
                    assert_eq!(got, json!({"n": n, "double": n * 2}), "thread {t} call {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread did not panic");
    }
    let stats = engine.pool_stats();
    assert!(stats.alive >= 1 && stats.alive <= stats.capacity, "{stats:?}");
    assert_eq!(stats.discarded, 0, "{stats:?}");
}

#[test]
fn a_vm_that_hit_a_limit_is_discarded_and_the_next_call_is_fine() {
    let yaml = "scripts:\n  pool: {size: 1}\n  usage:\n    timeout_ms: 30\n    script: |\n      if request.body.loop then while true do end end\n      return {ok = true}\n";
    let engine = Engine::new(Config::from_yaml(yaml, std::path::Path::new(".")).unwrap()).unwrap();
    let run = |looping: bool| {
        engine.run_json(
            HookName::Usage,
            &json!({"request": {"id": "x", "body": {"loop": looping}}}),
        )
    };
    assert_eq!(run(false).unwrap(), json!({"ok": true}));
    assert_eq!(run(true).unwrap_err().kind, ErrorKind::Timeout);
    assert_eq!(run(false).unwrap(), json!({"ok": true}));
    let stats = engine.pool_stats();
    assert_eq!((stats.discarded, stats.created, stats.alive), (1, 2, 1), "{stats:?}");
}

#[test]
fn a_busy_pool_times_out_instead_of_queueing_forever() {
    let yaml = "scripts:\n  pool: {size: 1, checkout_timeout_ms: 20}\n  usage:\n    timeout_ms: 5000\n    script: |\n      local t = os.clock() while os.clock() - t < 0.2 do end return {}\n";
    let engine = Arc::new(Engine::new(Config::from_yaml(yaml, std::path::Path::new(".")).unwrap()).unwrap());
    let busy = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || engine.run_json(HookName::Usage, &json!({})))
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let err = engine.run_json(HookName::Usage, &json!({})).expect_err("pool is busy");
    assert_eq!(err.kind, ErrorKind::Internal);
    assert!(err.message.contains("busy"), "{}", err.message);
    assert!(busy.join().unwrap().is_ok());
}

#[test]
fn vms_are_recycled_after_n_calls_and_above_the_memory_high_water_mark() {
    let yaml = "scripts:\n  pool: {size: 1, recycle_after_calls: 3}\n  usage: {script: 'return {}'}\n";
    let engine = Engine::new(Config::from_yaml(yaml, std::path::Path::new(".")).unwrap()).unwrap();
    for _ in 0..7 {
        engine.run_json(HookName::Usage, &json!({})).unwrap();
    }
    let stats = engine.pool_stats();
    // The VM built by Engine::new served the first 3 calls, a second one the
    // next 3, a third the last one.
    assert_eq!((stats.recycled, stats.discarded, stats.alive), (2, 0, 1), "{stats:?}");

    // A VM whose script pins 2 MB (a constant of the compiled chunk) stays
    // above a 1 MB mark after a full collection: replaced after each call.
    let yaml = format!(
        "scripts:\n  pool: {{size: 1, recycle_memory_mb: 1}}\n  usage:\n    script: |\n      local pinned = '{}'\n      return {{n = #pinned}}\n",
        "x".repeat(2 << 20)
    );
    let engine = Engine::new(Config::from_yaml(&yaml, std::path::Path::new(".")).unwrap()).unwrap();
    let before = engine.pool_stats().recycled; // the VM warmed up by Engine::new
    for _ in 0..2 {
        assert_eq!(
            engine.run_json(HookName::Usage, &json!({})).unwrap(),
            json!({"n": 2 << 20})
        );
    }
    assert_eq!(engine.pool_stats().recycled - before, 2, "{:?}", engine.pool_stats());

    // A global set by a call is gone with the call (the environment is
    // emptied): its 20 MB do not keep the VM above an 8 MB mark.
    let yaml = "scripts:\n  pool: {size: 1, recycle_memory_mb: 8}\n  usage:\n    memory_mb: 64\n    timeout_ms: 2000\n    script: |\n      if request.body.big then big = string.rep('x', 20e6) end\n      return {}\n";
    let engine = Engine::new(Config::from_yaml(yaml, std::path::Path::new(".")).unwrap()).unwrap();
    let run = |big: bool| engine.run_json(HookName::Usage, &json!({"request": {"id": "r", "body": {"big": big}}}));
    run(true).unwrap();
    run(false).unwrap();
    assert_eq!(engine.pool_stats().recycled, 0, "{:?}", engine.pool_stats());
}

/// A process forked after its engine built VMs (an nginx worker forked from
/// a master that loaded the config) has no deadline timer thread: the
/// parent's did not survive the fork. The child must still stop an endless
/// loop at its deadline.
#[test]
fn a_forked_child_still_stops_an_endless_loop() {
    let yaml = "scripts:\n  pool: {size: 1}\n  usage:\n    timeout_ms: 50\n    script: |\n      if request.body.spin then while true do end end\n      return {ok = true}\n";
    let engine = Engine::new(Config::from_yaml(yaml, std::path::Path::new(".")).unwrap()).unwrap();
    let spin = json!({"request": {"id": "r", "body": {"spin": true}}});
    let calm = json!({"request": {"id": "r", "body": {}}});
    assert_eq!(
        engine.run_json(HookName::Usage, &spin).unwrap_err().kind,
        ErrorKind::Timeout
    );
    // The pool's one VM, idle and healthy when the process forks.
    assert_eq!(engine.run_json(HookName::Usage, &calm).unwrap(), json!({"ok": true}));

    // SAFETY: the child only runs the engine and leaves with `_exit`; the
    // parent waits for it (and kills it if it hangs).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let stopped = matches!(engine.run_json(HookName::Usage, &spin), Err(e) if e.kind == ErrorKind::Timeout);
        let fine = engine.run_json(HookName::Usage, &calm).ok() == Some(json!({"ok": true}));
        // SAFETY: ends the child without running the test harness's exit.
        unsafe { libc::_exit(if stopped && fine { 0 } else { 1 }) };
    }
    let started = std::time::Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            break;
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the forked child's endless loop was never stopped");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status}"
    );
}
