//! Which hooks shape the response to a failed request, in what order
//! (docs/adr/042). Every host asks [`next_step`] and does what it says, so
//! the standalone gateway and the nginx module cannot disagree.
//!
//! The rule:
//!
//! 1. `error_handler` runs first, for every failure it applies to (the
//!    hook is enabled and the failure is not the hook system's own, see
//!    [`Facts::error_handler`]) of an identified caller (see
//!    [`Facts::caller_identified`]): failures the gateway finds itself (no
//!    backend, connect errors, timeouts, refusals, bad requests) and a
//!    backend's final error answer (status >= 400, no retry left). An
//!    unidentified caller (no key, an unknown, disabled or expired one, an
//!    address the key may not use) gets the gateway's own error body:
//!    a script must not shape, or learn from, what anyone can send.
//! 2. `response_transform` runs on a backend's error answer exactly as on
//!    any other backend answer — when it reaches the client as the
//!    backend's answer: `error_handler` did not run, returned `nil`, or
//!    failed under `on_error` other than `deny`. It sees the backend's
//!    status as `response.status_code`. It never runs on a body the
//!    gateway or `error_handler` wrote.
//! 3. A failure with neither hook gets the default: the backend's own
//!    answer when there is one, else the gateway's error body.
//!
//! Answers that are retried on another backend are seen by no hook.

use std::fmt;

/// Where the response to a failed request would come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The gateway found the failure itself: there is no backend answer
    /// (no backend, connect error, timeout, refusal, bad request).
    Gateway,
    /// A backend answered with an error status, and that answer is final.
    Upstream {
        /// Whether its body is JSON (transforms see JSON bodies only, as
        /// for successful answers).
        json_body: bool,
    },
}

/// What the host knows about a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Where the response would come from.
    pub source: Source,
    /// `error_handler` is enabled and this failure is not the hook
    /// system's own (a hook that failed under `on_error: deny`, hook
    /// threads overloaded) nor, in the gateway, a path that is not an
    /// endpoint.
    pub error_handler: bool,
    /// Who the caller is, is known: auth is off, or the presented key
    /// passes the identity checks
    /// ([`crate::hooks::StandardChecks::identify_caller`]), or admission let
    /// the request in. Hosts decide it from the request's headers, before
    /// and whatever the failure, so where a failure happens does not change
    /// who may shape it.
    pub caller_identified: bool,
    /// `response_transform` is enabled and applies to this request (an
    /// API endpoint, where transforms run).
    pub response_transform: bool,
}

/// How `error_handler` ended (or that it has not run yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// It has not run: ask for the first step.
    NotRun,
    /// `nil`, or a failure under `on_error` other than `deny`: the
    /// default response stands.
    Kept,
    /// It returned a response: that is what the client gets.
    Replaced,
    /// It failed under `on_error: deny`: the 503 `hook_failed`.
    Denied,
}

/// What the host does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Run `error_handler`, then ask again with how it ended.
    ErrorHandler,
    /// Run `response_transform` on the backend's error answer, then send.
    ResponseTransform,
    /// Send what there is (the default, or `error_handler`'s response).
    Send,
}

impl Step {
    /// The name hosts without Rust types use (`error_handler`,
    /// `response_transform`, `send`).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::ErrorHandler => "error_handler",
            Step::ResponseTransform => "response_transform",
            Step::Send => "send",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Handled {
    /// Parse the name hosts without Rust types use (`not_run`, `kept`,
    /// `replaced`, `denied`).
    pub fn parse(name: &str) -> Option<Handled> {
        match name {
            "not_run" => Some(Handled::NotRun),
            "kept" => Some(Handled::Kept),
            "replaced" => Some(Handled::Replaced),
            "denied" => Some(Handled::Denied),
            _ => None,
        }
    }
}

/// The next step for a failed request, given how `error_handler` ended.
pub fn next_step(facts: &Facts, handled: Handled) -> Step {
    match handled {
        Handled::NotRun if facts.error_handler && facts.caller_identified => Step::ErrorHandler,
        Handled::NotRun | Handled::Kept => match facts.source {
            Source::Upstream { json_body: true } if facts.response_transform => Step::ResponseTransform,
            _ => Step::Send,
        },
        Handled::Replaced | Handled::Denied => Step::Send,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Source = Source::Upstream { json_body: true };
    const UP_TEXT: Source = Source::Upstream { json_body: false };
    const GW: Source = Source::Gateway;

    #[test]
    fn every_case() {
        use Handled::*;
        use Step::*;
        // (source, error_handler applies, transform applies, handled, step)
        let cases = [
            (UP, true, true, NotRun, ErrorHandler),
            (UP, true, true, Kept, ResponseTransform),
            (UP, true, true, Replaced, Send),
            (UP, true, true, Denied, Send),
            (UP, false, true, NotRun, ResponseTransform),
            (UP, true, false, Kept, Send),
            (UP, false, false, NotRun, Send),
            (UP_TEXT, false, true, NotRun, Send),
            (UP_TEXT, true, true, Kept, Send),
            (GW, true, true, NotRun, ErrorHandler),
            (GW, true, true, Kept, Send),
            (GW, false, true, NotRun, Send),
            (GW, true, true, Replaced, Send),
        ];
        for (i, (source, error_handler, response_transform, handled, want)) in cases.into_iter().enumerate() {
            let facts = Facts {
                source,
                error_handler,
                caller_identified: true,
                response_transform,
            };
            assert_eq!(next_step(&facts, handled), want, "case {i}: {facts:?} {handled:?}");
        }
    }

    /// An unidentified caller's failure is never shaped by error_handler;
    /// a backend answer still goes through response_transform.
    #[test]
    fn an_unidentified_caller_gets_no_error_handler() {
        for (source, want) in [(GW, Step::Send), (UP, Step::ResponseTransform), (UP_TEXT, Step::Send)] {
            let facts = Facts {
                source,
                error_handler: true,
                caller_identified: false,
                response_transform: true,
            };
            assert_eq!(next_step(&facts, Handled::NotRun), want, "{source:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        for h in ["not_run", "kept", "replaced", "denied"] {
            assert!(Handled::parse(h).is_some(), "{h}");
        }
        assert_eq!(Handled::parse("nil"), None);
        assert_eq!(Step::ResponseTransform.to_string(), "response_transform");
    }
}
