//! `error_handler`: shape the error a client sees when a request fails.

use mlua::{Lua, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::transform::{body_text, result_header_changes};
use super::{expect_object, optional_status, HeaderChange, HookInput, HookName, RequestInfo, ResultForm};
use crate::convert::{self, Global, Scalar};
use crate::error::HookError;
use crate::http::fields::BodyText;

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
    /// The body a host sends as is: JSON text, encoded where the script
    /// returned it, as the transforms' is.
    const RESULT_FORM: ResultForm = ResultForm::BodyText;

    fn request_id(&self) -> Option<&str> {
        Some(&self.request.id)
    }

    fn set_globals(&self, lua: &Lua, _env: &Table) -> mlua::Result<()> {
        // SAFETY: the input outlives the call: `set_globals` runs inside
        // `Vm::call` (the `HookInput` contract).
        unsafe { self.request.defer(lua)? };
        let e = self.error;
        // Sorted by name, as the view keeps them; an absent backend_url
        // (the first) is left out.
        let fields = [
            ("backend_url", Scalar::Str(e.backend_url.as_deref().unwrap_or_default())),
            ("message", Scalar::Str(&e.message)),
            ("retry_count", Scalar::Int(i64::from(e.retry_count))),
            ("status_code", Scalar::Int(i64::from(e.status_code))),
            ("type", Scalar::Str(&e.kind)),
        ];
        let fields = if e.backend_url.is_some() {
            &fields[..]
        } else {
            &fields[1..]
        };
        // SAFETY: the strings are the input's, which outlives the call; the
        // list is copied.
        unsafe { convert::stage_globals(lua, &[("error", Global::Fields(fields))]) }
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
        /// The body sent to the client, as JSON text.
        body: Vec<u8>,
        /// Header changes.
        headers: Vec<(String, HeaderChange)>,
    },
}

impl ErrorResponse {
    /// Validate a script result; `fallback_status` is the failure's status.
    /// `body` and `headers` are what the call took out of `value` as it
    /// encoded it ([`ResultForm::BodyText`]); `None` where `value` still
    /// holds them (a body that is not a table, the JSON entry points).
    pub(crate) fn from_result(
        value: &Value,
        body: Option<BodyText>,
        headers: Option<convert::ResultHeaders>,
        fallback_status: u16,
    ) -> Result<Self, HookError> {
        if value.is_null() && body.is_none() {
            return Ok(ErrorResponse::Default);
        }
        let what = "error_handler";
        let obj = expect_object(value, what)?;
        let status_code = optional_status(obj, "status_code", what)?.unwrap_or(fallback_status);
        let headers = result_header_changes(obj, headers, what)?;
        let body = body_text(obj, body)
            .map(|b| b.text)
            .ok_or_else(|| HookError::bad_output("error_handler: 'body' is required"))?;
        Ok(ErrorResponse::Custom {
            status_code,
            body,
            headers,
        })
    }
}
