//! The seven hook points.

use std::fmt;
use std::str::FromStr;

/// One of the seven decision points a script can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookName {
    /// Picks a backend before load balancing.
    Routing,
    /// Decides over the standard key checks.
    Auth,
    /// Rewrites the request before it goes upstream.
    RequestTransform,
    /// Rewrites the response before it reaches the client.
    ResponseTransform,
    /// Decides over the standard rate limiter.
    RateLimit,
    /// Computes the usage record (billing) of a request.
    Usage,
    /// Shapes the error a client sees when a request fails.
    ErrorHandler,
}

impl HookName {
    /// All hooks, in the order a request meets them.
    pub const ALL: [HookName; 7] = [
        HookName::Auth,
        HookName::RateLimit,
        HookName::Routing,
        HookName::RequestTransform,
        HookName::ResponseTransform,
        HookName::Usage,
        HookName::ErrorHandler,
    ];

    /// The name used in configs, the CLI, metrics and the C ABI.
    pub fn as_str(self) -> &'static str {
        match self {
            HookName::Routing => "routing",
            HookName::Auth => "auth",
            HookName::RequestTransform => "request_transform",
            HookName::ResponseTransform => "response_transform",
            HookName::RateLimit => "rate_limit",
            HookName::Usage => "usage",
            HookName::ErrorHandler => "error_handler",
        }
    }

    /// A dense index (0..7) for per-hook arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The globals a script of this hook is given (`docs/architecture.md`, "Hooks").
    pub fn globals(self) -> &'static [&'static str] {
        match self {
            HookName::Routing => &["request", "backends"],
            HookName::Auth => &["request", "key_info", "standard_checks"],
            HookName::RequestTransform => &["request"],
            HookName::ResponseTransform => &["request", "response", "backend_url", "latency_ms"],
            HookName::RateLimit => &["request", "key_info", "rate_limit_status", "current_time"],
            HookName::Usage => &["request", "usage", "response", "metadata"],
            HookName::ErrorHandler => &["request", "error"],
        }
    }
}

impl fmt::Display for HookName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HookName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HookName::ALL.into_iter().find(|h| h.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = HookName::ALL.iter().map(|h| h.as_str()).collect();
            format!("unknown hook '{s}' (expected one of: {})", names.join(", "))
        })
    }
}
