//! `request_transform` and `response_transform`.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, OnceLock};

use mlua::{Lua, Table};
use serde_json::{Map, Value};

use super::{expect_object, json_type, optional_status, HookInput, HookName, RequestInfo, ResultForm};
use crate::convert::{self, Field, Global, HeaderValue};
use crate::error::HookError;
use crate::http::fields::{BodyText, TextBody};
use crate::http::hop_by_hop;
use crate::small_object;

/// Input of the `request_transform` hook (`request.backend_url` is set).
#[derive(Debug, Clone, Copy)]
pub struct RequestTransformInput<'a> {
    /// The client's request, with `backend_url` filled in.
    pub request: &'a RequestInfo,
}

impl HookInput for RequestTransformInput<'_> {
    const HOOK: HookName = HookName::RequestTransform;
    const RESULT_FORM: ResultForm = ResultForm::BodyText;

    fn request_id(&self) -> Option<&str> {
        Some(&self.request.id)
    }

    fn set_globals(&self, lua: &Lua, _env: &Table) -> mlua::Result<()> {
        // SAFETY: the input outlives the call: `set_globals` runs inside
        // `Vm::call` (the `HookInput` contract).
        unsafe { self.request.defer(lua) }
    }
}

/// A response as scripts see it (`response`).
#[derive(Debug, Clone, Default)]
pub struct ResponseInfo {
    /// HTTP status from the backend.
    pub status_code: u16,
    /// The body (for streams: this event's JSON), parsed or parsed when a
    /// script first reads it.
    pub body: ResponseBody,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Whether this is one event of a stream.
    pub is_stream: bool,
}

impl ResponseInfo {
    /// Set the `response` global of the current call: a lazy view, as
    /// `request` is.
    ///
    /// # Safety
    /// `self` outlives the VM's current call (as for [`convert::defer`]).
    pub(crate) unsafe fn defer(&self, lua: &Lua) -> mlua::Result<()> {
        // SAFETY: the caller's promise.
        unsafe { convert::defer(lua, "response", self) }
    }

    /// Build from the JSON form the CLI and the C ABI take.
    pub fn from_json(value: &Value) -> Result<ResponseInfo, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| format!("'response' must be an object, got {}", json_type(value)))?;
        let mut r = ResponseInfo {
            status_code: 200,
            ..Default::default()
        };
        if let Some(code) = small_object::field(obj, "status_code") {
            r.status_code = code
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .ok_or_else(|| String::from("'response.status_code' must be an integer"))?;
        }
        if let Some(body) = small_object::field(obj, "body") {
            r.body = body.clone().into();
        }
        if let Some(Value::Object(h)) = small_object::field(obj, "headers") {
            r.headers = h
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect();
        }
        r.is_stream = small_object::field(obj, "is_stream")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(r)
    }
}

/// A response body as `response.body` shows it: JSON parsed already, or a
/// backend's answer kept as text and parsed the first time a script reads
/// it (once, by whichever clone reads it first). A usage script that reads
/// only `usage` and `request` never pays for parsing a large answer; one
/// that reads `response.body` pays for it on its own time, as it would for
/// `json.decode`. Text that is not JSON reads as JSON `null` (`json.null`).
#[derive(Clone)]
pub struct ResponseBody(Repr);

#[derive(Clone)]
enum Repr {
    Json(Arc<Value>),
    Text(Arc<Unread>),
}

/// An answer kept as text until a script reads it.
struct Unread {
    text: Box<dyn AsRef<[u8]> + Send + Sync>,
    /// The parse: `None` when the text is not JSON.
    json: OnceLock<Option<Arc<Value>>>,
}

/// What a body that is not JSON reads as.
static NULL: Value = Value::Null;

impl ResponseBody {
    /// A backend's answer, parsed when first read.
    pub fn text(text: impl AsRef<[u8]> + Send + Sync + 'static) -> ResponseBody {
        ResponseBody(Repr::Text(Arc::new(Unread {
            text: Box::new(text),
            json: OnceLock::new(),
        })))
    }

    /// The body's JSON (`Value::Null` when it is not JSON), parsed now if
    /// nothing read it before.
    pub fn json(&self) -> &Value {
        self.parsed().map_or(&NULL, |v| &**v)
    }

    /// Whether the body is parsed JSON: given as JSON, or text read since
    /// and found to be JSON.
    pub fn is_parsed(&self) -> bool {
        match &self.0 {
            Repr::Json(_) => true,
            Repr::Text(t) => matches!(t.json.get(), Some(Some(_))),
        }
    }

    fn parsed(&self) -> Option<&Arc<Value>> {
        match &self.0 {
            Repr::Json(json) => Some(json),
            Repr::Text(t) => t
                .json
                .get_or_init(|| serde_json::from_slice::<Value>((*t.text).as_ref()).ok().map(Arc::new))
                .as_ref(),
        }
    }

    fn field(&self) -> Field<'_> {
        self.parsed().map_or(Field::Json(&NULL), Field::json)
    }
}

impl From<Arc<Value>> for ResponseBody {
    fn from(json: Arc<Value>) -> ResponseBody {
        ResponseBody(Repr::Json(json))
    }
}

impl From<Value> for ResponseBody {
    fn from(json: Value) -> ResponseBody {
        Arc::new(json).into()
    }
}

impl Default for ResponseBody {
    fn default() -> ResponseBody {
        Value::Null.into()
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Json(json) => json.fmt(f),
            Repr::Text(t) => match t.json.get() {
                Some(Some(json)) => json.fmt(f),
                Some(None) => f.write_str("<not JSON>"),
                None => write!(f, "<{} bytes, not read>", (*t.text).as_ref().len()),
            },
        }
    }
}

/// `response` as a lazy table.
impl convert::Fields for ResponseInfo {
    fn names(&self) -> Vec<&str> {
        vec!["body", "headers", "is_stream", "status_code"]
    }

    fn field(&self, name: &str) -> Field<'_> {
        match name {
            "body" => self.body.field(),
            "headers" => Field::Headers(&self.headers),
            "is_stream" => Field::Bool(self.is_stream),
            "status_code" => Field::Number(f64::from(self.status_code)),
            _ => Field::Nil,
        }
    }

    fn json(&self, name: &str) -> Option<Cow<'_, Value>> {
        Some(match name {
            "body" => Cow::Borrowed(self.body.json()),
            "headers" => Cow::Owned(super::headers_json(&self.headers)),
            "is_stream" => Cow::Owned(Value::Bool(self.is_stream)),
            "status_code" => Cow::Owned(Value::from(self.status_code)),
            _ => return None,
        })
    }
}

/// Input of the `response_transform` hook.
#[derive(Debug, Clone, Copy)]
pub struct ResponseTransformInput<'a> {
    /// The client's request.
    pub request: &'a RequestInfo,
    /// The backend's response.
    pub response: &'a ResponseInfo,
    /// The backend that answered.
    pub backend_url: &'a str,
    /// Upstream latency in milliseconds.
    pub latency_ms: f64,
}

impl HookInput for ResponseTransformInput<'_> {
    const HOOK: HookName = HookName::ResponseTransform;
    const RESULT_FORM: ResultForm = ResultForm::BodyText;

    fn request_id(&self) -> Option<&str> {
        Some(&self.request.id)
    }

    fn set_globals(&self, lua: &Lua, _env: &Table) -> mlua::Result<()> {
        // SAFETY: the input outlives the call: `set_globals` runs inside
        // `Vm::call` (the `HookInput` contract); the backend URL is the
        // input's.
        unsafe {
            self.request.defer(lua)?;
            self.response.defer(lua)?;
            let globals = [
                ("backend_url", Global::Text(self.backend_url)),
                ("latency_ms", Global::Number(self.latency_ms)),
            ];
            convert::stage_globals(lua, &globals)
        }
    }
}

/// One header change asked for by a transform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderChange {
    /// Set the header to this value (replacing any previous value).
    Set(String),
    /// Remove the header (`false` or `json.null` in the script).
    Remove,
}

/// The request changes a `request_transform` script asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRewrite {
    /// The new body as JSON text, its OpenAI fields checked; `None` keeps
    /// the original.
    pub body: Option<TextBody>,
    /// Header changes in a stable (name-sorted) order.
    pub headers: Vec<(String, HeaderChange)>,
}

impl RequestRewrite {
    /// Validate a script result (`body`: the result's body as text and
    /// `headers` its headers as read, taken out of `value` by the call,
    /// [`ResultForm::BodyText`]); `Ok(None)` means "unchanged".
    pub(crate) fn from_result(
        value: &Value,
        body: Option<BodyText>,
        headers: Option<convert::ResultHeaders>,
    ) -> Result<Option<Self>, HookError> {
        if value.is_null() && body.is_none() {
            return Ok(None);
        }
        let what = "request_transform";
        let obj = expect_object(value, what)?;
        // The host decides `stream` from this body, as from the client's.
        let body = body_text(obj, body)
            .map(TextBody::from_encoded)
            .transpose()
            .map_err(|e| HookError::bad_output(format!("{what}: body: {e}")))?;
        Ok(Some(RequestRewrite {
            body,
            headers: result_header_changes(obj, headers, what)?,
        }))
    }

    /// Validate a result held whole as JSON (the JSON entry points).
    pub fn validate(value: &Value) -> Result<(), HookError> {
        if value.is_null() {
            return Ok(());
        }
        let what = "request_transform";
        let obj = expect_object(value, what)?;
        if let Some(b) = small_object::field(obj, "body") {
            crate::http::fields::check(b).map_err(|e| HookError::bad_output(format!("{what}: body: {e}")))?;
        }
        header_changes(obj, what).map(drop)
    }
}

/// The response changes a `response_transform` script asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseRewrite {
    /// The new status; `None` keeps the backend's.
    pub status_code: Option<u16>,
    /// The new body as JSON text; `None` keeps the original.
    pub body: Option<Vec<u8>>,
    /// Header changes in a stable (name-sorted) order.
    pub headers: Vec<(String, HeaderChange)>,
}

impl ResponseRewrite {
    /// Validate a script result (`body` as for
    /// [`RequestRewrite::from_result`]); `Ok(None)` means "unchanged".
    pub(crate) fn from_result(
        value: &Value,
        body: Option<BodyText>,
        headers: Option<convert::ResultHeaders>,
    ) -> Result<Option<Self>, HookError> {
        if value.is_null() && body.is_none() {
            return Ok(None);
        }
        let what = "response_transform";
        let obj = expect_object(value, what)?;
        Ok(Some(ResponseRewrite {
            status_code: optional_status(obj, "status_code", what)?,
            body: body_text(obj, body).map(|b| b.text),
            headers: result_header_changes(obj, headers, what)?,
        }))
    }

    /// Drop the header changes that leave `current` as it is: a header set
    /// to the value it has (names compared case-insensitively), or removed
    /// when absent. An echoed header then stays as the backend sent it,
    /// repeated values included, and a host has nothing to apply.
    pub(crate) fn drop_unchanged_headers(&mut self, current: &[(String, String)]) {
        self.headers.retain(|(name, change)| {
            let have = current
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            match change {
                HeaderChange::Set(v) => have != Some(v.as_str()),
                HeaderChange::Remove => have.is_some(),
            }
        });
    }

    /// Validate a result held whole as JSON (the JSON entry points).
    pub fn validate(value: &Value) -> Result<(), HookError> {
        if value.is_null() {
            return Ok(());
        }
        let what = "response_transform";
        let obj = expect_object(value, what)?;
        optional_status(obj, "status_code", what)?;
        header_changes(obj, what).map(drop)
    }
}

/// The body as text: the call's, else (a result whose `body` a view or a
/// metatable provided) the value's, encoded.
pub(super) fn body_text(obj: &Map<String, Value>, text: Option<BodyText>) -> Option<BodyText> {
    text.or_else(|| small_object::field(obj, "body").map(|b| b.to_string().into_bytes().into()))
}

/// Parse `headers = {name = "value" | false | json.null}`; names must be
/// HTTP tokens and values must not contain CR, LF or NUL (no header
/// injection through a script).
///
/// Headers no script may set are skipped here; the engine drops them from
/// the result first, with a warning (see [`drop_unsettable`]).
pub(crate) fn header_changes(obj: &Map<String, Value>, what: &str) -> Result<Vec<(String, HeaderChange)>, HookError> {
    let headers = match small_object::field(obj, "headers") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(h)) => h,
        Some(Value::Array(a)) if a.is_empty() => return Ok(Vec::new()),
        Some(other) => {
            return Err(HookError::bad_output(format!(
                "{what}: 'headers' must be a table, got {}",
                json_type(other)
            )))
        }
    };
    let given = headers.iter().map(|(name, value)| {
        let value = match value {
            Value::String(s) => Given::Text(Cow::Borrowed(s)),
            Value::Number(n) => Given::Text(Cow::Owned(n.to_string())),
            Value::Bool(true) => Given::Text(Cow::Borrowed("true")),
            Value::Bool(false) | Value::Null => Given::Remove,
            other => Given::Other(json_type(other)),
        };
        (Cow::Borrowed(name.as_str()), value)
    });
    checked_changes(given, what)
}

/// A transform result's header changes: of the headers the call read as
/// they were (`read`, taken out of `obj`), else of `obj`'s.
pub(super) fn result_header_changes(
    obj: &Map<String, Value>,
    read: Option<convert::ResultHeaders>,
    what: &str,
) -> Result<Vec<(String, HeaderChange)>, HookError> {
    match read {
        Some(read) => read_header_changes(read, what),
        None => header_changes(obj, what),
    }
}

/// [`header_changes`] of headers the call read as they were
/// ([`convert::ResultHeaders`]): the same checks, the same errors.
fn read_header_changes(headers: convert::ResultHeaders, what: &str) -> Result<Vec<(String, HeaderChange)>, HookError> {
    let given = headers.into_iter().map(|(name, value)| {
        let value = match value {
            HeaderValue::Text(s) => Given::Text(Cow::Owned(s)),
            HeaderValue::Bool(true) => Given::Text(Cow::Borrowed("true")),
            HeaderValue::Bool(false) | HeaderValue::Null => Given::Remove,
        };
        (Cow::Owned(name), value)
    });
    checked_changes(given, what)
}

/// A header value of a script's result, as the checks see it.
enum Given<'a> {
    /// Text to set (a string, a number's text, `true`).
    Text(Cow<'a, str>),
    /// `false` or `json.null`.
    Remove,
    /// Anything else: its JSON type.
    Other(&'static str),
}

/// The checked changes of `headers`, in the order given (the first bad one
/// is the error), sorted by name.
fn checked_changes<'a>(
    headers: impl ExactSizeIterator<Item = (Cow<'a, str>, Given<'a>)>,
    what: &str,
) -> Result<Vec<(String, HeaderChange)>, HookError> {
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(HookError::bad_output(format!(
                "{what}: '{name}' is not a valid header name"
            )));
        }
        let change = match value {
            Given::Text(v) => HeaderChange::Set(v.into_owned()),
            Given::Remove => HeaderChange::Remove,
            Given::Other(got) => {
                return Err(HookError::bad_output(format!(
                    "{what}: header '{name}' must be a string, or false to remove it, got {got}"
                )))
            }
        };
        if !hop_by_hop::script_may_set(&name) {
            continue;
        }
        if let HeaderChange::Set(v) = &change {
            if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(HookError::bad_output(format!(
                    "{what}: header '{name}' contains CR, LF or NUL"
                )));
            }
        }
        out.push((name.into_owned(), change));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Remove the entries a script may not set from the `headers` table of a
/// transform or error_handler result ([`hop_by_hop::script_may_set`]: the
/// hop-by-hop ones, `Connection`, `Keep-Alive`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade`, `Proxy-*`, and the two every host
/// computes, `Content-Length` and `Host`); returns the names removed.
///
/// Dropped with a warning rather than refused as `bad_output`: those
/// headers describe the host's own connections or framing and no host can
/// honour a script's (a `Transfer-Encoding` or `Content-Length` the host
/// does not send would break its framing), but scripts legitimately echo
/// the headers they were given (the seed's response_transform returns
/// `headers = response.headers`), which carry a `Content-Length`, and a
/// host may show them a `Connection` or `Transfer-Encoding` it received;
/// failing those scripts would turn a harmless echo into a hook failure.
/// Dropping them from the result itself (not only from the parsed
/// changes) means hosts that take the result as JSON (the C ABI, the Lua
/// module) never see them either: no host keeps a list of its own.
pub(crate) fn drop_unsettable(result: &mut Value) -> Vec<String> {
    let Some(Value::Object(headers)) = result.get_mut("headers") else {
        return Vec::new();
    };
    let dropped: Vec<String> = headers
        .keys()
        .filter(|k| !hop_by_hop::script_may_set(k))
        .cloned()
        .collect();
    for k in &dropped {
        headers.remove(k);
    }
    dropped
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
