//! Admission: the auth and rate limit stages, and the [`Ticket`] every
//! admitted request carries to its end (docs/adr/030, 031).
//!
//! Auth: the key (`Authorization: Bearer` or `x-api-key`) is looked up in
//! the live key set; core's standard checks run with the key's live quota
//! usage; the `auth` script (if any) sees `key_info` and `standard_checks`:
//! `nil` keeps the standard verdict, a deny is final, an allow overrules
//! only the failed checks `may_override` lists (core's
//! `admission::decide`, docs/adr/040). Rate limit:
//! the standard limiter checks and takes (atomically: in this process, on a
//! batched node's view of the fleet's counters (docs/adr/051), or in Redis
//! with `state.mode: exact`); the `rate_limit` script sees `rate_limit_status` and
//! `current_time` and may overrule it either way (tokens are then taken or
//! given back).
//!
//! The limiter's steps (in this process, or Redis calls) run on the async
//! side; the auth and rate_limit scripts run between them as hook jobs,
//! inline when they are fast (docs/adr/049-inline-hooks-with-a-budget.md).
//!
//! An admitted request owns a [`Ticket`]: its concurrency slot and its
//! promise of exactly one usage record. Completing the ticket (success,
//! upstream error, end of stream) frees the slot and records usage; a
//! ticket dropped without completion (the client went away) does both
//! with status 499.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use llmproxy_core::admission::{self, Check};
use llmproxy_core::clock::{self, Zone};
use llmproxy_core::config::{LimitsConfig, StateOnError};
use llmproxy_core::hooks::{
    AuthVerdict, CurrentTime, KeyInfo, RateLimitStatus, RateVerdict, RequestInfo, ResponseInfo, StandardChecks,
    UsageMetadata, UsageRecord,
};
use llmproxy_core::keys::standard_checks_with_usage;
use llmproxy_core::policy::errors::GatewayError;
use llmproxy_core::policy::rate_stage::{self, RateRefusal, RateStep};
use llmproxy_core::policy::usage as usage_policy;
use llmproxy_core::request_handle::Step;
use llmproxy_core::HookName;
use serde_json::Value;

use super::backend::Backend;
use super::batched::{Batched, Unsettled};
use super::errors::{ErrorType, Failure};
use super::keyset::KeyEntry;
use super::ledger::{Charged, LedgerRecord, Served};
use super::limiter::{AcquireArgs, Acquired};
use super::live::Live;
use super::pipeline::{Denied, Timings};
use super::state::{Charge, LocalState, Permit, RedisState, State};
use super::{Shared, UsageEntry};

/// Why a request was not admitted.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// 401/403/429 (or 503 when the state backend is down): through
    /// `error_handler`.
    Fail(Box<Failure>),
    /// A script failed under `on_error: deny`: 503, not shaped.
    Deny(Denied),
}

/// Who the request is, as far as admission knows before it runs.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The configured key the client presented.
    pub key: Option<Arc<KeyEntry>>,
    /// The fingerprint of the presented key (known or not): the limiter's
    /// and the ledger's id for the caller.
    pub key_id: Option<Arc<str>>,
}

/// What admission hands to the rest of the request.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    /// The concurrency slot (when the limiter counts this caller).
    pub permit: Option<Permit>,
}

/// The clock as `rate_limit` scripts see it, in the configured zone
/// (core's [`clock::current_time`]).
pub fn current_time(zone: Zone) -> CurrentTime {
    clock::current_time(Utc::now(), zone)
}

fn auth_failure(status: u16, code: &'static str, message: String) -> Refusal {
    Refusal::Fail(Box::new(Failure::new(ErrorType::AuthError, status, code, message)))
}

/// Turn the auth script's step into admission or refusal: core's
/// [`admission::decide_step`], so a script's `allow = true` overrules only
/// the failed checks listed in `scripts.auth.may_override` (docs/adr/040),
/// and a script that failed under `on_error: deny` gets the standard
/// denial when a check failed, else 503. A standard 401 (no key, or an
/// unknown one) counts against the client's address in the auth throttle
/// (docs/adr/039).
fn judge_auth(
    shared: &Shared,
    step: Step<AuthVerdict>,
    checks: &StandardChecks,
    info: &RequestInfo,
    may_override: &[Check],
) -> Result<(), Refusal> {
    let decision = match admission::decide_step(checks, step, may_override) {
        Step::Ran(d) | Step::FellBack(d, _) => d,
        Step::Denied(error) => {
            shared.metrics.auth_denied("hook_failed");
            return Err(Refusal::Deny(Denied {
                hook: HookName::Auth,
                error,
            }));
        }
    };
    let Some(r) = decision.refusal() else {
        return Ok(());
    };
    shared.metrics.auth_denied(r.reason);
    if r.throttles {
        if let Some(ip) = info.client_ip.as_deref().and_then(|ip| ip.parse().ok()) {
            shared.throttles.api.failed(ip, Instant::now());
        }
    }
    Err(auth_failure(r.status, r.code, r.message))
}

/// The standard verdict alone (no auth script).
fn standard() -> Step<AuthVerdict> {
    Step::Ran(AuthVerdict::Standard)
}

/// The rate limit stage's 429 (core's decision), counted by its reason.
fn rate_refusal(shared: &Shared, r: RateRefusal) -> Refusal {
    shared.metrics.rate_limited(r.reason);
    let mut f = Failure::new(ErrorType::RateLimit, 429, r.code, r.message);
    f.retry_after = Some(r.retry_after);
    Refusal::Fail(Box::new(f))
}

/// The `key_info` of `key` (none: an unknown key) with `used`.
fn key_info(key: Option<&KeyEntry>, used: u64) -> KeyInfo<'_> {
    match key {
        Some(k) => k.key_info(used),
        None => KeyInfo::none(),
    }
}

/// The standard key checks before the request body is read
/// (docs/adr/036-bounds-before-the-body.md): an unknown, disabled or
/// expired key, a refused address, or (with local state) an exhausted
/// quota is refused without reading or parsing the body. Only when auth is
/// on and no `auth` script runs: a script may allow what the standard
/// checks deny (where `may_override` lets it), and it sees the body.
/// Admission proper runs later as before; the checks are cheap and
/// repeatable.
pub(crate) fn precheck(shared: &Shared, live: &Live, info: &RequestInfo, caller: &Caller) -> Result<(), Refusal> {
    if !live.auth_on || live.stages.enabled(HookName::Auth) {
        return Ok(());
    }
    let used = match (&*shared.state, &caller.key) {
        (State::Local(local), Some(k)) => local.used(&k.fingerprint),
        (State::Redis(r), Some(k)) => r.batched.as_ref().map_or(0, |b| b.used(&k.fingerprint)),
        _ => 0,
    };
    let checks = standard_checks_with_usage(
        caller.key.as_ref().map(|k| &k.record),
        used,
        info.client_ip.as_deref(),
        Utc::now(),
    );
    judge_auth(shared, standard(), &checks, info, &[])
}

/// The counters a request is decided on in this process: the local state
/// backend's, or a batched Redis node's view of the fleet's (docs/adr/051).
/// Neither makes a store call per request; a batched node waits only for a
/// settlement round (a key it has not seen, no room left under a limit).
#[derive(Clone, Copy)]
pub(crate) enum Counting<'a> {
    /// `state.backend: local`.
    Local(&'a LocalState),
    /// `state.backend: redis` with `mode: batched`.
    Fleet(&'a RedisState, &'a Batched),
}

impl Counting<'_> {
    /// Ready to check `key`: a batched node makes sure its view knows the
    /// key's usage; with `on_error: deny`, a Redis taken as down refuses.
    /// `Ok(true)`: Redis is unreachable and `on_error: allow` lets the
    /// request be decided on this node's counters alone.
    async fn prepare(&self, shared: &Shared, key: Option<&str>) -> Result<bool, Refusal> {
        let Counting::Fleet(redis, batched) = *self else {
            return Ok(false);
        };
        if redis.on_error() == StateOnError::Deny && redis.breaker_open() {
            return Err(state_unavailable(shared));
        }
        match key {
            Some(k) if batched.know(k, || !redis.breaker_open()).await.is_err() => {
                self.unsettled(shared).map(|()| true)
            }
            _ => Ok(false),
        }
    }

    /// A batched node could not settle: `on_error: deny` refuses, `allow`
    /// goes on with this node's counters (counted, settled later).
    fn unsettled(&self, shared: &Shared) -> Result<(), Refusal> {
        let Counting::Fleet(redis, _) = *self else {
            return Ok(());
        };
        match redis.on_error() {
            StateOnError::Deny => Err(state_unavailable(shared)),
            StateOnError::Allow => {
                if let Some(s) = shared.state.stats() {
                    s.fail_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    fn used(&self, fingerprint: &str) -> u64 {
        match self {
            Counting::Local(l) => l.used(fingerprint),
            Counting::Fleet(_, b) => b.used(fingerprint),
        }
    }

    /// The limiter's step. `offline`: [`Counting::prepare`] found Redis
    /// unreachable and `on_error: allow` (no room check, no wait).
    async fn acquire(&self, shared: &Shared, a: AcquireArgs<'_>, offline: bool) -> Result<Acquired, Refusal> {
        match *self {
            Counting::Local(l) => Ok(l.limiter.acquire(a)),
            Counting::Fleet(redis, b) => {
                let v = if offline {
                    b.acquire_unchecked(a.limits, a.key, a.force)
                } else {
                    match b.acquire(a.limits, a.key, a.force, || !redis.breaker_open()).await {
                        Ok(v) => v,
                        Err(Unsettled) => {
                            self.unsettled(shared)?;
                            b.acquire_unchecked(a.limits, a.key, a.force)
                        }
                    }
                };
                Ok(Acquired {
                    status: v.status,
                    denial: v.denial,
                    used: 0,
                    quota_exhausted: false,
                })
            }
        }
    }

    fn refund(&self, key: Option<&str>, limits: &LimitsConfig) {
        match self {
            Counting::Local(l) => l.limiter.refund(key, limits),
            Counting::Fleet(_, b) => b.refund(limits, key),
        }
    }

    fn force(&self, key: Option<&str>, limits: &LimitsConfig) {
        match self {
            Counting::Local(l) => {
                l.limiter.force(key, limits);
            }
            Counting::Fleet(_, b) => {
                b.acquire_unchecked(limits, key, true);
            }
        }
    }
}

fn state_unavailable(shared: &Shared) -> Refusal {
    shared.metrics.rate_limited("state_unavailable");
    Refusal::Fail(Box::new(Failure::of(GatewayError::state_unavailable())))
}

/// The whole admission on counters in this process ([`Counting`]). The
/// limiter steps run here (they never call a store per request); the auth
/// and rate_limit scripts run as hook jobs between them, inline when they
/// are fast (docs/adr/049).
pub(crate) async fn admit_counted(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    counting: Counting<'_>,
    info: &Arc<RequestInfo>,
    caller: &Caller,
    t: &mut Timings,
) -> Result<Admitted, Refusal> {
    let offline = counting
        .prepare(shared, caller.key.as_ref().map(|k| &*k.fingerprint))
        .await?;
    let used = caller.key.as_ref().map_or(0, |k| counting.used(&k.fingerprint));
    let auth_script = live.stages.enabled(HookName::Auth);
    let rate_script = live.stages.enabled(HookName::RateLimit);
    if live.auth_on {
        let checks = standard_checks_with_usage(
            caller.key.as_ref().map(|k| &k.record),
            used,
            info.client_ip.as_deref(),
            Utc::now(),
        );
        let step = if auth_script {
            auth_script_job(shared, live, info, caller.key.clone(), used, checks, t).await?
        } else {
            standard()
        };
        judge_auth(shared, step, &checks, info, &live.config().auth_may_override)?;
    }
    let mut admitted = Admitted::default();
    if live.limit_on {
        let limits = live.limits();
        let key = caller.key_id.as_deref();
        let acq = counting
            .acquire(
                shared,
                AcquireArgs {
                    key,
                    limits,
                    force: false,
                },
                offline,
            )
            .await?;
        let took = acq.denial.is_none();
        let verdict = if rate_script {
            match rate_limit_script_job(shared, live, info, caller.key.clone(), used, acq.status, t).await {
                Ok(Ok(v)) => v,
                Ok(Err(d)) => {
                    if took {
                        counting.refund(key, limits);
                    }
                    return Err(Refusal::Deny(d));
                }
                Err(overloaded) => {
                    if took {
                        counting.refund(key, limits);
                    }
                    return Err(overloaded);
                }
            }
        } else {
            RateVerdict::Standard
        };
        match rate_stage::decide(&verdict, took, acq.denial.as_ref()) {
            RateStep::Admit { force } => {
                if force {
                    counting.force(key, limits);
                }
            }
            RateStep::Refuse { refund, refusal } => {
                if refund {
                    counting.refund(key, limits);
                }
                return Err(rate_refusal(shared, refusal));
            }
        }
        if let Some(id) = &caller.key_id {
            admitted.permit = Some(Permit::new(&shared.state, Arc::clone(id)));
        }
    }
    Ok(admitted)
}

/// The auth script's step, as a hook job (a failure under `on_error:
/// deny` is [`Step::Denied`]; [`judge_auth`] decides).
async fn auth_script_job(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    info: &Arc<RequestInfo>,
    key: Option<Arc<KeyEntry>>,
    used: u64,
    checks: StandardChecks,
    t: &mut Timings,
) -> Result<Step<AuthVerdict>, Refusal> {
    let (l2, i2) = (Arc::clone(live), Arc::clone(info));
    let job = move || {
        let mut t = Timings::default();
        let r = l2.stages.auth(&i2, key_info(key.as_deref(), used), checks, &mut t);
        (r, t)
    };
    Ok(
        match hook_job(shared, HookName::Auth, job, || AuthVerdict::Standard, t).await? {
            Ok(verdict) => Step::Ran(verdict),
            Err(d) => Step::Denied(d.error),
        },
    )
}

/// The rate_limit script's verdict on `status`, as a hook job: the outer
/// error is an overloaded pool, the inner one a failure under `on_error:
/// deny` (the caller gives its tokens back in both cases).
async fn rate_limit_script_job(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    info: &Arc<RequestInfo>,
    key: Option<Arc<KeyEntry>>,
    used: u64,
    status: RateLimitStatus,
    t: &mut Timings,
) -> Result<Result<RateVerdict, Denied>, Refusal> {
    let (l2, i2) = (Arc::clone(live), Arc::clone(info));
    let now = current_time(live.zone);
    let job = move || {
        let mut t = Timings::default();
        let r = l2
            .stages
            .rate_limit(&i2, key_info(key.as_deref(), used), status, now, &mut t);
        (r, t)
    };
    hook_job(shared, HookName::RateLimit, job, || RateVerdict::Standard, t).await
}

/// A hook job from async code (inline when fast, else on a hook thread); a
/// lost job counts as a script failure, a job the overloaded pool refused
/// is a 503 `hooks_overloaded` (outer error).
async fn hook_job<T: Send + 'static>(
    shared: &Arc<Shared>,
    hook: HookName,
    f: impl Fn() -> (Result<T, Denied>, Timings) + Send + 'static,
    lost_default: impl FnOnce() -> T,
    timings: &mut Timings,
) -> Result<Result<T, Denied>, Refusal> {
    match shared.hooks.call(f).await {
        Ok((r, t)) => {
            timings.merge(t);
            Ok(r)
        }
        Err(e) if e.is_overload() => Err(Refusal::Fail(Box::new(Failure::overloaded()))),
        Err(_) => Ok(match shared.live().stages.lost(hook) {
            Some(d) => Err(d),
            None => Ok(lost_default()),
        }),
    }
}

fn state_failure(shared: &Shared, redis: &RedisState) -> Option<Refusal> {
    match redis.on_error() {
        StateOnError::Allow => None,
        StateOnError::Deny => Some(state_unavailable(shared)),
    }
}

/// The whole admission with the Redis state backend in `exact` mode (one
/// Redis call per limiter step).
pub(crate) async fn admit_redis(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    redis: &RedisState,
    info: &Arc<RequestInfo>,
    caller: &Caller,
    t: &mut Timings,
) -> Result<Admitted, Refusal> {
    let auth_script = live.stages.enabled(HookName::Auth);
    let rate_script = live.stages.enabled(HookName::RateLimit);
    let record = caller.key.as_ref().map(|k| &k.record);
    let mut used = 0;
    let mut quota_total = 0;
    // The usage `key_info` shows: the one auth saw, else the limiter's.
    let mut info_used = None;
    if live.auth_on {
        if auth_script {
            if let Some(k) = &caller.key {
                match redis.used(&k.fingerprint).await {
                    Ok(u) => used = u,
                    Err(_) => {
                        if let Some(r) = state_failure(shared, redis) {
                            return Err(r);
                        }
                    }
                }
            }
            let checks = standard_checks_with_usage(record, used, info.client_ip.as_deref(), Utc::now());
            info_used = Some(used);
            let step = auth_script_job(shared, live, info, caller.key.clone(), used, checks, t).await?;
            judge_auth(shared, step, &checks, info, &live.config().auth_may_override)?;
        } else {
            // Everything but the quota now; the quota is checked by Redis in
            // the same step as the limits.
            let checks = standard_checks_with_usage(record, 0, info.client_ip.as_deref(), Utc::now());
            judge_auth(shared, standard(), &checks, info, &[])?;
            quota_total = record.and_then(|r| r.quota_limit()).unwrap_or(0);
        }
    }
    if !live.limit_on && quota_total == 0 {
        return Ok(Admitted::default());
    }
    let limits = live.limits();
    let mut no_limits;
    let limits = if live.limit_on {
        limits
    } else {
        // Only the quota is asked for.
        no_limits = limits.clone();
        no_limits.global_rpm = 0;
        no_limits.key_rpm = 0;
        no_limits.key_tpm = 0;
        no_limits.key_concurrency = 0;
        &no_limits
    };
    let key = caller.key_id.as_deref();
    let acq: Acquired = match redis
        .acquire(
            AcquireArgs {
                key,
                limits,
                force: false,
            },
            quota_total,
        )
        .await
    {
        Ok(a) => a,
        Err(_) => {
            return match state_failure(shared, redis) {
                Some(r) => Err(r),
                None => Ok(Admitted::default()),
            }
        }
    };
    if acq.quota_exhausted {
        let checks = standard_checks_with_usage(record, acq.used, info.client_ip.as_deref(), Utc::now());
        judge_auth(shared, standard(), &checks, info, &[])?;
    }
    let took = acq.denial.is_none();
    let slot = |shared: &Arc<Shared>| key.map(|id| Permit::new(&shared.state, Arc::from(id)));
    if !live.limit_on {
        return Ok(Admitted { permit: slot(shared) });
    }
    let verdict = if rate_script {
        let used = info_used.unwrap_or(acq.used);
        let r = match rate_limit_script_job(shared, live, info, caller.key.clone(), used, acq.status, t).await {
            Ok(r) => r,
            Err(overloaded) => {
                if took {
                    redis.refund(key, limits).await;
                }
                return Err(overloaded);
            }
        };
        match r {
            Ok(v) => v,
            Err(d) => {
                if took {
                    redis.refund(key, limits).await;
                }
                return Err(Refusal::Deny(d));
            }
        }
    } else {
        RateVerdict::Standard
    };
    match rate_stage::decide(&verdict, took, acq.denial.as_ref()) {
        RateStep::Admit { force } => {
            let forced = !force
                || redis
                    .acquire(
                        AcquireArgs {
                            key,
                            limits,
                            force: true,
                        },
                        0,
                    )
                    .await
                    .is_ok();
            // A request the script allowed but the store could not count
            // goes through uncounted (no slot to give back).
            Ok(Admitted {
                permit: if forced { slot(shared) } else { None },
            })
        }
        RateStep::Refuse { refund, refusal } => {
            if refund {
                redis.refund(key, limits).await;
            }
            Err(rate_refusal(shared, refusal))
        }
    }
}

/// How an admitted request ended.
#[derive(Debug, Default)]
pub(crate) struct Completion {
    /// The backend that answered last, if any.
    pub backend: Option<Arc<Backend>>,
    /// The status the client got (499: it went away first).
    pub status: u16,
    /// Usage as the backend reported it.
    pub usage: Option<Value>,
    /// The response the usage script sees (default: status and no body).
    pub response: Option<ResponseInfo>,
    /// Upstream latency in milliseconds (0 without a backend).
    pub latency_ms: f64,
    /// Whether the response was streamed.
    pub is_stream: bool,
}

/// An admitted request's slot and its promise of one usage record.
#[derive(Debug)]
pub(crate) struct Ticket {
    inner: Option<TicketInner>,
}

#[derive(Debug)]
struct TicketInner {
    shared: Arc<Shared>,
    live: Arc<Live>,
    info: Arc<RequestInfo>,
    caller: Caller,
    permit: Option<Permit>,
    started: Instant,
}

impl Ticket {
    /// The ticket of a request admitted by `admitted`.
    pub fn new(
        shared: &Arc<Shared>,
        live: &Arc<Live>,
        info: &Arc<RequestInfo>,
        caller: &Caller,
        admitted: Admitted,
        started: Instant,
    ) -> Ticket {
        Ticket {
            inner: Some(TicketInner {
                shared: Arc::clone(shared),
                live: Arc::clone(live),
                info: Arc::clone(info),
                caller: caller.clone(),
                permit: admitted.permit,
                started,
            }),
        }
    }

    /// Free the slot now and return the usage job (the usage script, the
    /// quota charge, the ledger record) to run where it fits. The record's
    /// time is now, before the client has the answer: the job may run
    /// later, and a quota reset in between must not count it (docs/adr/043).
    pub fn job(mut self, c: Completion) -> Option<UsageJob> {
        let mut inner = self.inner.take()?;
        drop(inner.permit.take());
        Some(UsageJob::new(inner, c, super::ledger::now_ms()))
    }

    /// Free the slot and run the usage job (see [`run_usage`]).
    pub fn complete(self, c: Completion) {
        let Some(shared) = self.inner.as_ref().map(|i| Arc::clone(&i.shared)) else {
            return;
        };
        let live = self.inner.as_ref().map(|i| Arc::clone(&i.live));
        if let (Some(job), Some(live)) = (self.job(c), live) {
            run_usage(&shared, &live, job);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let t = Ticket {
                inner: self.inner.take(),
            };
            t.complete(Completion {
                status: 499,
                ..Completion::default()
            });
        }
    }
}

/// Run a usage job: the usage script inline when it is fast, else the
/// whole job on a hook thread (docs/adr/049); with no usage script, here.
/// When the hook threads are already shut down it runs here: a usage
/// record is never dropped.
pub(crate) fn run_usage(shared: &Shared, live: &Live, job: UsageJob) {
    if !live.stages.enabled(HookName::Usage) {
        return job.run();
    }
    match shared.hooks.try_inline(&|| job.record()) {
        Some(Ok(record)) => job.finish(record),
        _ => shared.hooks.spawn_or_inline(move || job.run()),
    }
}

/// The usage stage of one admitted request: the script (a pure call,
/// [`UsageJob::record`]), then its effects: metrics, the quota charge, the
/// ledger record and the sinks ([`UsageJob::finish`]).
pub(crate) struct UsageJob {
    inner: TicketInner,
    c: Completion,
    /// The backend's usage (zeros when it never came).
    raw: Value,
    response: ResponseInfo,
    metadata: UsageMetadata,
    answered_ms: i64,
}

impl UsageJob {
    fn new(inner: TicketInner, mut c: Completion, answered_ms: i64) -> UsageJob {
        let raw = c
            .usage
            .take()
            .filter(Value::is_object)
            .unwrap_or_else(usage_policy::zero_usage);
        let response = c.response.take().unwrap_or_else(|| ResponseInfo {
            status_code: c.status,
            body: Default::default(),
            headers: Vec::new(),
            is_stream: c.is_stream,
        });
        let metadata = UsageMetadata {
            backend_url: c.backend.as_ref().map(|b| b.url.clone()).unwrap_or_default(),
            latency_ms: c.latency_ms,
            is_stream: c.is_stream,
        };
        UsageJob {
            inner,
            c,
            raw,
            response,
            metadata,
            answered_ms,
        }
    }

    /// The usage script's record (no effect but the hook call).
    fn record(&self) -> UsageRecord {
        let mut t = Timings::default();
        let i = &self.inner;
        i.live
            .stages
            .usage(&i.info, &self.raw, &self.response, &self.metadata, &mut t)
    }

    /// The whole job, where it may block.
    pub fn run(self) {
        let record = self.record();
        self.finish(record);
    }

    /// Everything after the script: metrics, charge, ledger, sinks.
    fn finish(self, result: UsageRecord) {
        let UsageJob {
            inner,
            c,
            raw,
            metadata,
            answered_ms,
            ..
        } = self;
        let TicketInner {
            shared,
            live,
            info,
            caller,
            started,
            ..
        } = inner;
        let estimated = llmproxy_core::usage_estimate::is_estimated(&raw);
        if estimated {
            shared
                .metrics
                .bounds
                .usage_estimated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let backend_url = metadata.backend_url;
        // The record's text is for the ledger and the sinks only.
        let kept = shared.ledger.is_some() || !shared.usage_sinks.is_empty();
        let (charged, record_json) = match result {
            UsageRecord::Raw if kept => (usage_policy::charge(&raw, None), usage_policy::record_json(&raw)),
            UsageRecord::Raw => (usage_policy::charge(&raw, None), String::new()),
            UsageRecord::Custom(c) => (usage_policy::charge(&raw, Some(&c)), c.into_json()),
        };
        let billable = charged.billable_tokens;
        let backend_name = c.backend.as_ref().map(|b| b.name.clone());
        if let Some(b) = &c.backend {
            for (kind, v) in &charged.metrics {
                shared.metrics.usage(b.index, kind, *v);
            }
        }
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let key_fp = caller.key_id.as_deref();
        let ledger_record = shared.ledger.as_ref().map(|_| {
            let charged = Charged {
                charge: &charged,
                record_json: &record_json,
            };
            let served = Served {
                node: &shared.node,
                key_fp,
                backend: backend_name.as_deref(),
                status: c.status,
                is_stream: c.is_stream,
                answered_ms,
                latency_ms,
                charge_quota: shared.state.backend().ledger_holds_quota(),
            };
            LedgerRecord::of(&info, Some(charged), served)
        });
        shared.state.charge(
            Charge {
                key: caller.key_id.as_deref(),
                billable,
                tokens: charged.limit_tokens,
                answered_ms,
            },
            live.limits(),
            ledger_record,
            shared.ledger.as_deref(),
        );
        // Built only for a sink, moved into the last one.
        let Some((last, others)) = shared.usage_sinks.split_last() else {
            return;
        };
        let entry = UsageEntry {
            request_id: info.id.clone(),
            backend: backend_name.unwrap_or_default(),
            backend_url,
            path: info.path.clone().unwrap_or_default(),
            is_stream: c.is_stream,
            raw,
            record_json,
            status: c.status,
            key_fingerprint: key_fp.map(str::to_owned),
            user_id: info.user_id.clone(),
            model: info.model().map(str::to_owned),
            billable_tokens: billable,
            latency_ms,
            estimated,
        };
        for sink in others {
            sink.record(entry.clone());
        }
        last.record(entry);
    }
}
