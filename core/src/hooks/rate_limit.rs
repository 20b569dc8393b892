//! `rate_limit`: decide over the standard rate limiter.

use mlua::{Lua, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{expect_object, optional_non_negative, optional_string, required_bool};
use super::{HookInput, HookName, KeyInfo, RequestInfo};
use crate::convert::{self, Global, Scalar};
use crate::error::HookError;

/// The standard limiter's view, shown as `rate_limit_status`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateLimitStatus {
    /// Requests left in the global window.
    pub global_remaining: i64,
    /// Requests left in this key's window.
    pub key_remaining: i64,
    /// This key's requests in flight.
    pub concurrent_count: i64,
}

/// The clock as scripts see it (`current_time`), in the configured zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentTime {
    /// Hour of day, 0-23.
    pub hour: u32,
    /// Day of week, 1 = Monday … 7 = Sunday (the seed's 3 = Wednesday).
    pub weekday: u32,
    /// Unix timestamp in seconds.
    pub timestamp: i64,
}

/// Input of the `rate_limit` hook.
#[derive(Debug, Clone)]
pub struct RateLimitInput<'a> {
    /// The client's request.
    pub request: &'a RequestInfo,
    /// The key's record with its live usage (none when unknown:
    /// `key_info == nil` in scripts).
    pub key_info: KeyInfo<'a>,
    /// The standard limiter's counters.
    pub rate_limit_status: RateLimitStatus,
    /// The current time.
    pub current_time: CurrentTime,
}

impl HookInput for RateLimitInput<'_> {
    const HOOK: HookName = HookName::RateLimit;

    fn request_id(&self) -> Option<&str> {
        Some(&self.request.id)
    }

    fn set_globals(&self, lua: &Lua, _env: &Table) -> mlua::Result<()> {
        // SAFETY: the input outlives the call: `set_globals` runs inside
        // `Vm::call` (the `HookInput` contract).
        unsafe { self.request.defer(lua)? };
        // SAFETY: as above.
        let key_info = unsafe { self.key_info.defer(lua)? };
        let s = &self.rate_limit_status;
        // Sorted by name, as the views keep them.
        let status = [
            ("concurrent_count", Scalar::Int(s.concurrent_count)),
            ("global_remaining", Scalar::Int(s.global_remaining)),
            ("key_remaining", Scalar::Int(s.key_remaining)),
        ];
        let t = &self.current_time;
        let time = [
            ("hour", Scalar::Int(i64::from(t.hour))),
            ("timestamp", Scalar::Int(t.timestamp)),
            ("weekday", Scalar::Int(i64::from(t.weekday))),
        ];
        // An unknown key's `null` key_info is left out (`nil`).
        let globals = [
            ("key_info", key_info.into()),
            ("rate_limit_status", Global::Fields(&status)),
            ("current_time", Global::Fields(&time)),
        ];
        // SAFETY: key_info is the input's (or a static null), which
        // outlives the call; the lists are copied.
        unsafe { convert::stage_globals(lua, &globals) }
    }
}

/// What the rate-limit script decided.
#[derive(Debug, Clone, PartialEq)]
pub enum RateVerdict {
    /// `nil`: the standard limiter's verdict stands.
    Standard,
    /// `{allow = true}`.
    Allow,
    /// `{allow = false, reason?, retry_after?}`: 429.
    Deny {
        /// Shown to the client.
        reason: Option<String>,
        /// Seconds, for `Retry-After`.
        retry_after: Option<f64>,
    },
}

impl RateVerdict {
    /// Validate a script result.
    pub fn from_result(value: &Value) -> Result<Self, HookError> {
        if value.is_null() {
            return Ok(RateVerdict::Standard);
        }
        let what = "rate_limit";
        let obj = expect_object(value, what)?;
        if required_bool(obj, "allow", what)? {
            return Ok(RateVerdict::Allow);
        }
        Ok(RateVerdict::Deny {
            reason: optional_string(obj, "reason", what)?,
            retry_after: optional_non_negative(crate::small_object::field(obj, "retry_after"), "retry_after", what)?,
        })
    }
}
