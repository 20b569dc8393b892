//! The rate limit stage's decision: the standard limiter's verdict and the
//! `rate_limit` script's, combined the same way by every host.
//!
//! The limiter runs first: it takes the request (and a concurrency slot),
//! or says which limit refused and takes nothing. The script then sees the
//! limiter's status and may overrule it either way: `nil` keeps the
//! limiter's verdict, `{allow = true}` admits a refused request (the host
//! then takes it without a check, so it still counts), `{allow = false}`
//! refuses an admitted one (the host gives back what was taken). A script
//! that failed is not decided here: its `on_error` policy applies first,
//! and `standard` then reads as [`RateVerdict::Standard`].
//!
//! Cases every host runs: `conformance/rate-stage.json`.

use crate::hooks::RateVerdict;

use super::limits::LimitDenial;

/// `Retry-After` of a script's refusal that names none, when no limit
/// refused either (seconds).
pub const DEFAULT_RETRY_AFTER: f64 = 60.0;

/// A refusal of the rate limit stage: 429, type `rate_limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateRefusal {
    /// The error code (`key_rate_limit`, `rate_limited_by_script`, ...).
    pub code: &'static str,
    /// What the client is told.
    pub message: String,
    /// Whole seconds for `Retry-After`, at least 1.
    pub retry_after: u64,
    /// The `reason` label of `llmproxy_rate_limited_total`.
    pub reason: &'static str,
}

/// What the host does after the rate limit stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateStep {
    /// Admit the request. `force`: the limiter refused it and took nothing,
    /// so take it now without a limit check (the script allowed it).
    Admit {
        /// Take the request without a limit check.
        force: bool,
    },
    /// Refuse the request. `refund`: give back what the limiter took.
    Refuse {
        /// Give back what the limiter took.
        refund: bool,
        /// The answer.
        refusal: RateRefusal,
    },
}

/// Combine the limiter's verdict (`denial`: the limit that refused, if
/// any; `took`: whether it took the request, false also when nothing is
/// counted) with the script's.
pub fn decide(script: &RateVerdict, took: bool, denial: Option<&LimitDenial>) -> RateStep {
    match script {
        RateVerdict::Standard => match denial {
            None => RateStep::Admit { force: false },
            Some(d) => RateStep::Refuse {
                refund: took,
                refusal: RateRefusal {
                    code: d.kind.code(),
                    message: d.kind.message().to_owned(),
                    retry_after: whole_seconds(d.retry_after),
                    reason: d.kind.as_str(),
                },
            },
        },
        RateVerdict::Allow => RateStep::Admit {
            force: denial.is_some() && !took,
        },
        RateVerdict::Deny { reason, retry_after } => RateStep::Refuse {
            refund: took,
            refusal: RateRefusal {
                code: "rate_limited_by_script",
                message: reason.clone().unwrap_or_else(|| "rate limited".to_owned()),
                retry_after: whole_seconds(
                    retry_after
                        .or(denial.map(|d| d.retry_after))
                        .unwrap_or(DEFAULT_RETRY_AFTER),
                ),
                reason: "script",
            },
        },
    }
}

/// Seconds for `Retry-After`: rounded up, at least 1.
fn whole_seconds(s: f64) -> u64 {
    if s.is_nan() || s < 1.0 {
        return 1;
    }
    // A float-to-int `as` saturates: a huge wait stays huge.
    s.ceil() as u64
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::Value;

    use super::*;
    use crate::policy::limits::LimitKind;

    #[derive(Deserialize)]
    struct Case {
        name: String,
        script: Value,
        took: bool,
        denial: Option<Denial>,
        expect: Value,
    }

    #[derive(Deserialize)]
    struct Denial {
        kind: String,
        retry_after: f64,
    }

    fn as_json(step: &RateStep) -> Value {
        match step {
            RateStep::Admit { force } => serde_json::json!({"admit": true, "force": force}),
            RateStep::Refuse { refund, refusal } => serde_json::json!({
                "admit": false,
                "refund": refund,
                "code": refusal.code,
                "message": refusal.message,
                "retry_after": refusal.retry_after,
                "reason": refusal.reason,
            }),
        }
    }

    #[test]
    fn the_shared_cases_decide_as_written() {
        let text = include_str!("../../../conformance/rate-stage.json");
        #[derive(Deserialize)]
        struct File {
            cases: Vec<Case>,
        }
        let cases = serde_json::from_str::<File>(text)
            .expect("rate-stage.json parses")
            .cases;
        assert!(cases.len() >= 8);
        for c in cases {
            let script = RateVerdict::from_result(&c.script).expect("a valid script result");
            let denial = c.denial.map(|d| LimitDenial {
                kind: LimitKind::parse(&d.kind).expect("a limit kind"),
                retry_after: d.retry_after,
            });
            let got = as_json(&decide(&script, c.took, denial.as_ref()));
            assert_eq!(got, c.expect, "{}", c.name);
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_and_never_zero() {
        for (s, want) in [
            (0.0, 1),
            (0.2, 1),
            (1.0, 1),
            (1.01, 2),
            (59.5, 60),
            (f64::NAN, 1),
            (-3.0, 1),
        ] {
            assert_eq!(whole_seconds(s), want, "{s}");
        }
        assert_eq!(whole_seconds(f64::INFINITY), u64::MAX);
    }
}
