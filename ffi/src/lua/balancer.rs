//! `llmproxy.balancer{...}`: the core's default balancer and backend health
//! (`llmproxy_core::policy::backends`) for a host that keeps one per worker
//! (nginx) and does the I/O. Indices are the backends' 1-based positions in
//! the list the balancer was built from.
//!
//! ```lua
//! local bal = llmproxy.balancer{ kind = "weighted_round_robin",
//!     health = { failures_to_unhealthy = 3, successes_to_healthy = 1, cooldown_ms = 5000 },
//!     backends = { { weight = 1, usable = true, group = 1 }, ... } }
//! local i = bal:pick(now_ms, skip, group)  -- skip: nil or {[i] = true}; group: nil or a group
//! local healthy, latency_ms, active = bal:begin(i)
//! local healthy, latency_ms, active, change, failures = bal:finish(i, "success" | "failure" | nil, now_ms, latency_ms)
//! local healthy, latency_ms, active, change, failures = bal:probed(i, "success" | "failure", now_ms)
//! local healthy, latency_ms, active = bal:view(i)
//! ```

use std::cell::RefCell;

use llmproxy_core::config::{BalancerKind, HealthConfig};
use llmproxy_core::policy::backends::{BackendSet, BackendView, HealthChange};
use mlua::{Lua, Table, UserData, UserDataMethods, Value};

/// One worker's balancer: the core's state, and what the host says of each
/// backend once (whether it can reach it, and its group: backends a retry
/// may go to share one).
pub(crate) struct LuaBalancer {
    set: RefCell<BackendSet>,
    usable: Vec<bool>,
    group: Vec<i64>,
}

/// What `begin`, `finish` and `view` return first.
type ViewTuple = (bool, f64, u64);

fn tuple(v: BackendView) -> ViewTuple {
    (v.healthy, v.latency_ms, v.active)
}

/// What `finish` and `probed` return: the backend's view, and its health
/// change with the failures in a row that made it.
type VerdictTuple = (bool, f64, u64, Option<&'static str>, Option<u32>);

impl LuaBalancer {
    /// Apply `verdict` to backend `i` (0-based).
    fn verdict(
        &self,
        i: usize,
        verdict: Option<&str>,
        now_ms: f64,
        latency_ms: Option<f64>,
    ) -> mlua::Result<VerdictTuple> {
        let change = {
            let mut set = self.set.borrow_mut();
            match verdict {
                Some("success") => set.success(i, latency_ms),
                Some("failure") => set.failure(i, now_ms),
                None => None,
                Some(other) => {
                    return Err(mlua::Error::runtime(format!(
                        "llmproxy.balancer: verdict '{other}' (success, failure or nil)"
                    )))
                }
            }
        };
        let (healthy, latency_ms, active) = self.view(i);
        let (change, failures) = match change {
            Some(HealthChange::Unhealthy { failures }) => (Some("unhealthy"), Some(failures)),
            Some(HealthChange::Healthy) => (Some("healthy"), None),
            None => (None, None),
        };
        Ok((healthy, latency_ms, active, change, failures))
    }

    /// The 0-based index of 1-based `i`, when it names a backend.
    fn index(&self, i: i64) -> mlua::Result<usize> {
        usize::try_from(i - 1)
            .ok()
            .filter(|&i| i < self.usable.len())
            .ok_or_else(|| mlua::Error::runtime(format!("llmproxy.balancer: no backend {i}")))
    }

    fn view(&self, i: usize) -> ViewTuple {
        self.set.borrow().view(i).map_or((false, 0.0, 0), tuple)
    }
}

impl UserData for LuaBalancer {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // -> the picked backend's index, or nil when none may be tried
        methods.add_method(
            "pick",
            |_, this, (now_ms, skip, group): (f64, Option<Table>, Option<i64>)| {
                let mut skipped = vec![false; this.usable.len()];
                if let Some(skip) = skip {
                    for pair in skip.pairs::<i64, Value>() {
                        let (i, v) = pair?;
                        if let Ok(i) = this.index(i) {
                            skipped[i] = !matches!(v, Value::Nil | Value::Boolean(false));
                        }
                    }
                }
                let allowed = |i: usize| this.usable[i] && !skipped[i] && group.is_none_or(|g| this.group[i] == g);
                Ok(this.set.borrow_mut().pick(now_ms, allowed).map(|i| i + 1))
            },
        );
        // A request sent to backend `i` -> its view
        methods.add_method("begin", |_, this, i: i64| {
            let i = this.index(i)?;
            this.set.borrow_mut().begin(i);
            Ok(this.view(i))
        });
        // The request sent to backend `i` ended with `verdict` ("success",
        // "failure", or nil: none, e.g. the client left first) -> its view,
        // and "unhealthy" (with the failures in a row) or "healthy" when its
        // health changed.
        methods.add_method(
            "finish",
            |_, this, (i, verdict, now_ms, latency_ms): (i64, Option<mlua::BorrowedStr>, f64, Option<f64>)| {
                let i = this.index(i)?;
                this.set.borrow_mut().end(i);
                this.verdict(i, verdict.as_deref(), now_ms, latency_ms)
            },
        );
        // An active probe of backend `i` (no request of its own in flight)
        // ended with `verdict` ("success" or "failure") -> as `finish`.
        methods.add_method(
            "probed",
            |_, this, (i, verdict, now_ms): (i64, mlua::BorrowedStr, f64)| {
                let i = this.index(i)?;
                this.verdict(i, Some(&verdict), now_ms, None)
            },
        );
        methods.add_method("view", |_, this, i: i64| Ok(this.view(this.index(i)?)));
    }
}

/// `llmproxy.balancer{kind, health, backends}` (see the module's doc).
pub(crate) fn from_table(_: &Lua, t: Table) -> mlua::Result<LuaBalancer> {
    let kind = match t.raw_get::<Option<mlua::BorrowedStr>>("kind")?.as_deref() {
        None => BalancerKind::default(),
        Some(name) => BalancerKind::parse(name)
            .ok_or_else(|| mlua::Error::runtime(format!("llmproxy.balancer: unknown kind '{name}'")))?,
    };
    let mut health = HealthConfig::default();
    if let Some(h) = t.raw_get::<Option<Table>>("health")? {
        let count = |name: &str, default: u32| -> mlua::Result<u32> {
            Ok(h.raw_get::<Option<u32>>(name)?.filter(|&n| n > 0).unwrap_or(default))
        };
        health.failures_to_unhealthy = count("failures_to_unhealthy", health.failures_to_unhealthy)?;
        health.successes_to_healthy = count("successes_to_healthy", health.successes_to_healthy)?;
        health.cooldown_ms = h.raw_get::<Option<u64>>("cooldown_ms")?.unwrap_or(health.cooldown_ms);
    }
    let list: Table = t.raw_get("backends")?;
    let (mut weights, mut usable, mut group) = (Vec::new(), Vec::new(), Vec::new());
    for b in list.sequence_values::<Table>() {
        let b = b?;
        weights.push(b.raw_get::<Option<u32>>("weight")?.unwrap_or(1));
        usable.push(b.raw_get::<Option<bool>>("usable")?.unwrap_or(true));
        group.push(b.raw_get::<Option<i64>>("group")?.unwrap_or(0));
    }
    Ok(LuaBalancer {
        set: RefCell::new(BackendSet::new(kind, &health, weights)),
        usable,
        group,
    })
}
