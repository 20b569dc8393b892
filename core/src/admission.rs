//! The auth decision every host makes: the standard checks and the `auth`
//! script's verdict in, the answer out (docs/adr/040).
//!
//! A script may always deny, and `nil` keeps the standard verdict. A
//! script's `{allow = true}` lets a request in only where no standard check
//! failed, or where every check that failed is one the config lets scripts
//! overrule (`scripts.auth.may_override`, default none). So the seed's auth
//! example, which ends with `return {allow = true}`, cannot let an unknown,
//! disabled, expired, address-refused or spent key in unless the operator
//! says so per check.
//!
//! A script that fails under `on_error: standard` keeps the standard
//! verdict; under `on_error: deny` it fails closed: the standard denial
//! when a check failed (the client gets the precise 401/403/429), else the
//! request fails (503) ([`decide_step`]).
//!
//! Pure data in, data out: the gateway (`proxy/src/gateway/admission.rs`)
//! and the request handle's auth step in the Lua module (`h:auth`, used
//! by nginx) both call [`decide_step`].

use serde::{Deserialize, Serialize};

use crate::hooks::{AuthVerdict, StandardChecks};
use crate::request_handle::Step;

/// One standard check, by the name its failure has in the config's
/// `may_override` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// No key, or a key the config does not know (`key_valid`): 401.
    Unknown,
    /// The key's status is `disabled` (`status_active`): 403.
    Disabled,
    /// The key's `expires_at` has passed (`not_expired`): 403.
    Expired,
    /// The client's address is not in `allowed_ips` (`ip_allowed`): 403.
    IpNotAllowed,
    /// The key's quota is used up (`quota_available`): 429.
    QuotaExhausted,
}

impl Check {
    /// Every check, in the order the standard verdict reports them.
    pub const ALL: [Check; 5] = [
        Check::Unknown,
        Check::Disabled,
        Check::Expired,
        Check::IpNotAllowed,
        Check::QuotaExhausted,
    ];

    /// The config name (`unknown`, `disabled`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Unknown => "unknown",
            Check::Disabled => "disabled",
            Check::Expired => "expired",
            Check::IpNotAllowed => "ip_not_allowed",
            Check::QuotaExhausted => "quota_exhausted",
        }
    }

    /// Whether this check passed.
    pub fn passed(self, c: &StandardChecks) -> bool {
        match self {
            Check::Unknown => c.key_valid,
            Check::Disabled => c.status_active,
            Check::Expired => c.not_expired,
            Check::IpNotAllowed => c.ip_allowed,
            Check::QuotaExhausted => c.quota_available,
        }
    }

    /// The standard denial when this check fails.
    pub fn denial(self) -> Denial {
        let (status, code, reason, message) = match self {
            Check::Unknown => (401, "invalid_api_key", "invalid_key", "invalid or missing API key"),
            Check::Disabled => (403, "key_disabled", "disabled", "API key is disabled"),
            Check::Expired => (403, "key_expired", "expired", "API key has expired"),
            Check::IpNotAllowed => (
                403,
                "ip_not_allowed",
                "ip_not_allowed",
                "client address is not allowed for this API key",
            ),
            Check::QuotaExhausted => (429, "quota_exhausted", "quota_exhausted", "API key quota is exhausted"),
        };
        Denial {
            check: self,
            status,
            code,
            reason,
            message,
        }
    }
}

/// A standard denial: what the client gets and how it is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    /// The check that failed.
    pub check: Check,
    /// HTTP status (401, 403 or 429).
    pub status: u16,
    /// The error `code` in the body (`invalid_api_key`, `key_disabled`, ...).
    pub code: &'static str,
    /// The `reason` label of `llmproxy_auth_denied_total`.
    pub reason: &'static str,
    /// The error message.
    pub message: &'static str,
}

/// The first failing standard check's denial, `None` when all passed.
pub fn standard_denial(checks: &StandardChecks) -> Option<Denial> {
    Check::ALL.into_iter().find(|c| !c.passed(checks)).map(Check::denial)
}

/// What the auth stage answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admitted.
    Allow,
    /// Refused by a standard check (the script said `nil`, or allowed what
    /// it may not overrule).
    Standard(Denial),
    /// Refused by the script.
    Script {
        /// HTTP status (403 unless the script gave one).
        status: u16,
        /// The script's reason, if any.
        reason: Option<String>,
    },
}

/// How a refused request is answered and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRefusal {
    /// HTTP status.
    pub status: u16,
    /// The error `code` in the body.
    pub code: &'static str,
    /// The error message.
    pub message: String,
    /// The `reason` label of `llmproxy_auth_denied_total`.
    pub reason: &'static str,
    /// The refusal counts against the client's address in the auth
    /// throttle (a standard 401: no key, or an unknown one; docs/adr/039).
    pub throttles: bool,
}

impl Decision {
    /// The refusal, `None` when admitted.
    pub fn refusal(self) -> Option<AuthRefusal> {
        match self {
            Decision::Allow => None,
            Decision::Script { status, reason } => Some(AuthRefusal {
                status,
                code: "denied_by_script",
                message: reason.unwrap_or_else(|| String::from("access denied")),
                reason: "script",
                throttles: false,
            }),
            Decision::Standard(d) => Some(AuthRefusal {
                status: d.status,
                code: d.code,
                message: d.message.to_owned(),
                reason: d.reason,
                throttles: d.check == Check::Unknown,
            }),
        }
    }
}

/// Decide over the standard checks and the script's verdict
/// ([`AuthVerdict::Standard`] when no script runs). `may_override` lists
/// the checks whose failure a script's `allow = true` overrules.
pub fn decide(checks: &StandardChecks, verdict: &AuthVerdict, may_override: &[Check]) -> Decision {
    match verdict {
        AuthVerdict::Deny { reason, status_code } => Decision::Script {
            status: *status_code,
            reason: reason.clone(),
        },
        AuthVerdict::Standard => standard_denial(checks).map_or(Decision::Allow, Decision::Standard),
        // Without a key the other checks have nothing to check (they read
        // false): only `unknown` decides.
        AuthVerdict::Allow if !checks.key_valid => match may_override.contains(&Check::Unknown) {
            true => Decision::Allow,
            false => Decision::Standard(Check::Unknown.denial()),
        },
        AuthVerdict::Allow => Check::ALL
            .into_iter()
            .find(|c| !c.passed(checks) && !may_override.contains(c))
            .map_or(Decision::Allow, |c| Decision::Standard(c.denial())),
    }
}

/// Decide over the standard checks and the auth script's step (the
/// request handle's `auth`, or a host's own call through [`Step::of`]): a
/// verdict, or the fallback of a script that failed under `on_error:
/// standard`, decides with [`decide`]; a script that failed under
/// `on_error: deny` yields the standard denial when a check failed (its
/// failure kept for the host's metrics and log), else stays denied: the
/// request fails (503).
pub fn decide_step(checks: &StandardChecks, step: Step<AuthVerdict>, may_override: &[Check]) -> Step<Decision> {
    match step {
        Step::Ran(v) => Step::Ran(decide(checks, &v, may_override)),
        Step::FellBack(v, e) => Step::FellBack(decide(checks, &v, may_override), e),
        Step::Denied(e) => match standard_denial(checks) {
            Some(d) => Step::FellBack(Decision::Standard(d), e),
            None => Step::Denied(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, HookError};

    const PASS: StandardChecks = StandardChecks {
        key_valid: true,
        status_active: true,
        not_expired: true,
        ip_allowed: true,
        quota_available: true,
    };

    fn failing(check: Check) -> StandardChecks {
        let mut c = PASS;
        match check {
            Check::Unknown => {
                c = StandardChecks {
                    key_valid: false,
                    status_active: false,
                    not_expired: false,
                    ip_allowed: false,
                    quota_available: false,
                }
            }
            Check::Disabled => c.status_active = false,
            Check::Expired => c.not_expired = false,
            Check::IpNotAllowed => c.ip_allowed = false,
            Check::QuotaExhausted => c.quota_available = false,
        }
        c
    }

    fn code(d: &Decision) -> Option<u16> {
        match d {
            Decision::Allow => None,
            Decision::Standard(d) => Some(d.status),
            Decision::Script { status, .. } => Some(*status),
        }
    }

    #[test]
    fn a_script_allow_never_overrules_a_failed_check_unless_the_config_says_so() {
        // (failed check, may_override, status after `allow = true`)
        let cases: [(Check, &[Check], Option<u16>); 10] = [
            (Check::Unknown, &[], Some(401)),
            (Check::Disabled, &[], Some(403)),
            (Check::Expired, &[], Some(403)),
            (Check::IpNotAllowed, &[], Some(403)),
            (Check::QuotaExhausted, &[], Some(429)),
            (Check::Unknown, &[Check::Unknown], None),
            (Check::Disabled, &[Check::Disabled, Check::Expired], None),
            (Check::Expired, &[Check::Disabled], Some(403)),
            (Check::IpNotAllowed, &[Check::IpNotAllowed], None),
            (Check::QuotaExhausted, &[Check::QuotaExhausted], None),
        ];
        for (check, may, want) in cases {
            let c = failing(check);
            assert_eq!(code(&decide(&c, &AuthVerdict::Allow, may)), want, "{check:?} {may:?}");
            // nil keeps the standard verdict whatever may_override says.
            assert_eq!(
                decide(&c, &AuthVerdict::Standard, may),
                Decision::Standard(check.denial()),
                "{check:?}"
            );
            // A script may always deny.
            let deny = AuthVerdict::Deny {
                reason: None,
                status_code: 402,
            };
            assert_eq!(code(&decide(&c, &deny, may)), Some(402));
        }
        assert_eq!(decide(&PASS, &AuthVerdict::Allow, &[]), Decision::Allow);
        assert_eq!(decide(&PASS, &AuthVerdict::Standard, &[]), Decision::Allow);
        // Two failures, one overridable: the other still refuses.
        let mut two = PASS;
        two.status_active = false;
        two.not_expired = false;
        assert_eq!(
            decide(&two, &AuthVerdict::Allow, &[Check::Disabled]),
            Decision::Standard(Check::Expired.denial())
        );
    }

    #[test]
    fn a_script_that_fails_closed_gets_the_standard_denial_when_a_check_failed() {
        let e = || HookError::new(ErrorKind::ScriptError, "boom");
        let allow = Step::Ran(AuthVerdict::Allow);
        // (checks, the script's step, the stage's step as (status, failed, denied))
        type Case = (StandardChecks, Step<AuthVerdict>, Option<u16>, bool, bool);
        let cases: [Case; 6] = [
            (PASS, allow.clone(), None, false, false),
            (failing(Check::Disabled), allow, Some(403), false, false),
            (PASS, Step::FellBack(AuthVerdict::Standard, e()), None, true, false),
            (
                failing(Check::Unknown),
                Step::FellBack(AuthVerdict::Standard, e()),
                Some(401),
                true,
                false,
            ),
            // on_error: deny: the precise standard denial, else 503.
            (
                failing(Check::QuotaExhausted),
                Step::Denied(e()),
                Some(429),
                true,
                false,
            ),
            (PASS, Step::Denied(e()), None, true, true),
        ];
        for (i, (checks, step, status, failed, denied)) in cases.into_iter().enumerate() {
            let out = decide_step(&checks, step, &[]);
            assert_eq!(out.failure().is_some(), failed, "case {i}");
            assert_eq!(matches!(out, Step::Denied(_)), denied, "case {i}");
            if let Ok(d) = out.into_result() {
                assert_eq!(code(&d), status, "case {i}");
            }
        }
    }

    #[test]
    fn check_names_round_trip_through_the_config_form() {
        for c in Check::ALL {
            let v: Check = serde_json::from_value(serde_json::json!(c.as_str())).unwrap();
            assert_eq!(v, c);
        }
        assert!(serde_json::from_value::<Check>(serde_json::json!("ip")).is_err());
    }
}
