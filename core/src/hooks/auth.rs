//! `auth`: decide over the standard key checks.

use mlua::{Lua, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{expect_object, optional_status, optional_string, required_bool};
use super::{HookInput, HookName, KeyInfo, RequestInfo};
use crate::convert::{self, Global, Scalar};
use crate::error::HookError;

/// Results of the standard key checks, shown to the script as
/// `standard_checks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandardChecks {
    /// The key exists.
    pub key_valid: bool,
    /// The key's status is `active`.
    pub status_active: bool,
    /// The key has not expired.
    pub not_expired: bool,
    /// The client's address is in the key's `allowed_ips`.
    pub ip_allowed: bool,
    /// The key's quota is not used up.
    pub quota_available: bool,
}

impl StandardChecks {
    /// The standard verdict: every check passed.
    pub fn all_passed(&self) -> bool {
        self.key_valid && self.status_active && self.not_expired && self.ip_allowed && self.quota_available
    }

    /// The checks that say who the caller is passed: the key is known,
    /// active, unexpired and allowed from this address. The quota is not
    /// one of them: a caller over quota is still known.
    pub fn identify_caller(&self) -> bool {
        self.key_valid && self.status_active && self.not_expired && self.ip_allowed
    }
}

/// Input of the `auth` hook.
#[derive(Debug, Clone)]
pub struct AuthInput<'a> {
    /// The client's request.
    pub request: &'a RequestInfo,
    /// The key's record (seed fields: key, user_id, name, status, quotas,
    /// allowed_ips, expires_at) with its live usage; none when the key is
    /// unknown, which scripts see as `key_info == nil`.
    pub key_info: KeyInfo<'a>,
    /// The standard checks.
    pub standard_checks: StandardChecks,
}

impl HookInput for AuthInput<'_> {
    const HOOK: HookName = HookName::Auth;

    fn request_id(&self) -> Option<&str> {
        Some(&self.request.id)
    }

    fn set_globals(&self, lua: &Lua, _env: &Table) -> mlua::Result<()> {
        // SAFETY: the input outlives the call: `set_globals` runs inside
        // `Vm::call` (the `HookInput` contract).
        unsafe { self.request.defer(lua)? };
        // SAFETY: as above.
        let key_info = unsafe { self.key_info.defer(lua)? };
        let c = &self.standard_checks;
        // Sorted by name, as the view keeps them.
        let checks = [
            ("ip_allowed", Scalar::Bool(c.ip_allowed)),
            ("key_valid", Scalar::Bool(c.key_valid)),
            ("not_expired", Scalar::Bool(c.not_expired)),
            ("quota_available", Scalar::Bool(c.quota_available)),
            ("status_active", Scalar::Bool(c.status_active)),
        ];
        // An unknown key's `null` key_info is left out (`nil`).
        let globals = [
            ("key_info", key_info.into()),
            ("standard_checks", Global::Fields(&checks)),
        ];
        // SAFETY: key_info is the input's (or a static null), which
        // outlives the call; the lists are copied.
        unsafe { convert::stage_globals(lua, &globals) }
    }
}

/// What the auth script decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthVerdict {
    /// `nil`: the standard verdict stands.
    Standard,
    /// `{allow = true}`: allowed where the standard checks passed, or
    /// where every failed check is one the config lets scripts overrule
    /// ([`crate::admission::decide`]).
    Allow,
    /// `{allow = false, reason?, status_code?}`: denied (403 by default).
    Deny {
        /// Shown to the client.
        reason: Option<String>,
        /// HTTP status for the denial.
        status_code: u16,
    },
}

impl AuthVerdict {
    /// Status used when a denying script gives none.
    pub const DEFAULT_DENY_STATUS: u16 = 403;

    /// Validate a script result.
    pub fn from_result(value: &Value) -> Result<Self, HookError> {
        if value.is_null() {
            return Ok(AuthVerdict::Standard);
        }
        let what = "auth";
        let obj = expect_object(value, what)?;
        if required_bool(obj, "allow", what)? {
            return Ok(AuthVerdict::Allow);
        }
        Ok(AuthVerdict::Deny {
            reason: optional_string(obj, "reason", what)?,
            status_code: optional_status(obj, "status_code", what)?.unwrap_or(Self::DEFAULT_DENY_STATUS),
        })
    }
}
