//! `error_handler`: shape the error a client sees when a request fails.

use mlua::{Lua, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::transform::header_changes;
use super::{expect_object, optional_status, serialized, HeaderChange, HookInput, HookName, RequestInfo};
use crate::convert;
use crate::error::HookError;

/// The failure, shown as the `error` global.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// `backend_error`, `timeout`, `auth_error`, `rate_limit` or `bad_request`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What happened, for humans.
    pub message: String,
    /// The status the gateway would answer with.
    pub status_code: u16,
    /// The backend involved, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_url: Option<String>,
    /// Retries made before giving up.
    pub retry_count: u32,
}

/// Input of the `error_handler` hook.
#[derive(Debug, Clone, Copy)]
pub struct ErrorInput<'a> {
    /// The client's request.
    pub request: &'a RequestInfo,
    /// The failure.
    pub error: &'a ErrorInfo,
}

impl HookInput for ErrorInput<'_> {
    const HOOK: HookName = HookName::ErrorHandler;

    fn request_id(&self) -> Option<&str> {
        Some(&self.request.id)
    }

    fn set_globals(&self, lua: &Lua, env: &Table) -> mlua::Result<()> {
        // SAFETY: the input outlives the call: `set_globals` runs inside
        // `Vm::call` (the `HookInput` contract).
        unsafe { self.request.defer(lua)? };
        let error = serialized(self.error)?;
        convert::set_globals(lua, env, &[("error", &error)])
    }
}

/// What the error handler decided.
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorResponse {
    /// `nil`: the gateway's default error body.
    Default,
    /// A custom response.
    Custom {
        /// HTTP status (defaults to the failure's own status).
        status_code: u16,
        /// The body sent to the client.
        body: Value,
        /// Header changes.
        headers: Vec<(String, HeaderChange)>,
    },
}

impl ErrorResponse {
    /// Validate a script result; `fallback_status` is the failure's status.
    pub fn from_result(value: &Value, fallback_status: u16) -> Result<Self, HookError> {
        if value.is_null() {
            return Ok(ErrorResponse::Default);
        }
        let what = "error_handler";
        let obj = expect_object(value, what)?;
        let body = obj
            .get("body")
            .cloned()
            .ok_or_else(|| HookError::bad_output("error_handler: 'body' is required"))?;
        Ok(ErrorResponse::Custom {
            status_code: optional_status(obj, "status_code", what)?.unwrap_or(fallback_status),
            body,
            headers: header_changes(obj, what)?,
        })
    }
}
