//! Hook inputs on their way into the core: the hook lookup every entry point
//! does, and the inputs a host parses **once** and reuses for many calls: a
//! request ([`Request`]: `llmp_request`, `llmproxy.request`) and a hook's
//! other globals ([`Globals`]: `llmp_globals`).
//!
//! A host runs several hooks on one request (routing, auth, usage, ...),
//! and its backend set changes rarely. Parsing a 10 KB body on every hook
//! call costs more than running the script, so the body is parsed once into
//! a core [`RequestInfo`] (its body shared through an `Arc`), the globals
//! once into a JSON map, and [`run`] hands both to
//! [`Engine::run_parts`](llmproxy_core::Engine::run_parts).
//!
//! Limits: a handle is built without an engine, so it is parsed within the
//! largest limits any config may set ([`MAX_DEPTH`], [`MAX_BYTES`]; serde's
//! own 128-level recursion limit applies first, as on every path). Its size
//! and nesting are recorded, and [`run`] checks them against the hook's own
//! `max_input_bytes` and `max_depth` on every call: a handle is accepted
//! by a hook exactly when the same JSON passed to `llmp_engine_run` as one
//! input would be. The request's and the globals' text count together
//! against `max_input_bytes`, as they would in one input.

use std::sync::OnceLock;

use llmproxy_core::config::HookConfig;
use llmproxy_core::convert::{self, Limits};
use llmproxy_core::engine::HookGlobals;
use llmproxy_core::hooks::{BackendStatus, RequestInfo, ResponseInfo};
use llmproxy_core::http::{api::Api, fields};
use llmproxy_core::policy::errors::GatewayError;
use llmproxy_core::request_handle::RequestHandle;
use llmproxy_core::{Engine, HookError, HookName};
use serde_json::{Map, Value};

use crate::capi::error::Failure;

/// The deepest `max_depth` a config may set; the globals object itself is
/// one level above it.
pub const MAX_DEPTH: usize = llmproxy_core::config::MAX_DEPTH_LIMIT;
/// The largest `max_input_bytes` a config may set (4 GiB).
pub const MAX_BYTES: usize = llmproxy_core::config::MAX_BYTES_LIMIT;

/// The hook named `hook`, which must be enabled in `engine`.
pub fn enabled<'e>(engine: &'e Engine, hook: &str) -> Result<(HookName, &'e HookConfig), Failure> {
    let name: HookName = hook
        .parse()
        .map_err(|e: String| Failure::invalid(format!("hook: {e}")))?;
    match engine.config().hook(name) {
        Some(cfg) => Ok((name, cfg)),
        None => Err(Failure::invalid(format!(
            "hook: the {name} hook is not enabled in this engine"
        ))),
    }
}

/// A request parsed once, for any number of hook calls. Immutable.
#[derive(Debug)]
pub struct Request {
    info: RequestInfo,
    /// Size of the JSON text it came from (0 when built from host values).
    bytes: usize,
    /// Nesting of the request object (the object itself is level 1).
    depth: usize,
    /// Nesting of the body when it came as text (`body_raw`), else 0.
    raw_body_depth: usize,
    /// Size of `body_raw`, else 0.
    raw_body_bytes: usize,
}

impl Request {
    /// Parse the JSON text of a `request` object (`body` given parsed, or
    /// as JSON text in `body_raw`).
    pub fn parse(text: &[u8]) -> Result<Request, Failure> {
        let value = parse_text(text, MAX_DEPTH, "request_json")?;
        Request::from_value(&value, text.len())
    }

    /// Build from a parsed `request` object; `bytes` is the size of the
    /// text it came from (0 if none).
    pub fn from_value(value: &Value, bytes: usize) -> Result<Request, Failure> {
        let depth = convert::json_depth(value);
        if depth > MAX_DEPTH {
            return Err(Failure::invalid(format!(
                "request: nesting is {depth} levels, deeper than any limit ({MAX_DEPTH})"
            )));
        }
        let limits = Limits {
            max_depth: MAX_DEPTH,
            max_bytes: MAX_BYTES,
        };
        let info = RequestInfo::from_json(value, limits).map_err(Failure::invalid)?;
        let (raw_body_depth, raw_body_bytes) = match value.get("body_raw") {
            Some(Value::String(s)) => (convert::json_depth(&info.body), s.len()),
            _ => (0, 0),
        };
        Ok(Request {
            info,
            bytes,
            depth,
            raw_body_depth,
            raw_body_bytes,
        })
    }

    /// A request a host built field by field (`llmproxy.request` on a
    /// table): `depth` is the request object's nesting, `raw_body_depth`
    /// and `raw_body_bytes` those of `body_raw` when it came as text (else
    /// 0), as [`Request::from_value`] records them.
    pub fn from_parts(info: RequestInfo, depth: usize, raw_body_depth: usize, raw_body_bytes: usize) -> Request {
        Request {
            info,
            bytes: 0,
            depth,
            raw_body_depth,
            raw_body_bytes,
        }
    }

    /// Nesting of the request object (the object itself is level 1).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The core's request.
    pub fn info(&self) -> &RequestInfo {
        &self.info
    }

    /// A copy with the fields of the JSON object `fields` set (e.g.
    /// `backend_url` after routing). The body is shared, not re-parsed,
    /// unless `fields` holds `body` or `body_raw`. `bytes` is the size of
    /// the text `fields` came from (0 if none). Limits are tracked as for
    /// [`Request::from_value`]: nesting is the deeper of the two objects
    /// (conservative when `body` is replaced), sizes add up.
    pub fn with_fields(&self, fields: &Value, bytes: usize) -> Result<Request, Failure> {
        let depth = convert::json_depth(fields);
        if depth > MAX_DEPTH {
            return Err(Failure::invalid(format!(
                "fields: nesting is {depth} levels, deeper than any limit ({MAX_DEPTH})"
            )));
        }
        let limits = Limits {
            max_depth: MAX_DEPTH,
            max_bytes: MAX_BYTES,
        };
        let info = self.info.with_fields(fields, limits).map_err(Failure::invalid)?;
        let (raw_body_depth, raw_body_bytes) = match (fields.get("body_raw"), fields.get("body")) {
            (Some(Value::String(s)), _) => (convert::json_depth(&info.body), s.len()),
            (_, Some(_)) => (0, 0),
            _ => (self.raw_body_depth, self.raw_body_bytes),
        };
        Ok(Request {
            info,
            bytes: self.bytes.saturating_add(bytes),
            depth: self.depth.max(depth),
            raw_body_depth,
            raw_body_bytes,
        })
    }
}

/// A hook's globals other than `request`, parsed once. Immutable.
#[derive(Debug, Default)]
pub struct Globals {
    /// Every global but `request` and `response`.
    globals: HookGlobals,
    /// `response`, when given.
    response: Option<ResponseInfo>,
    /// Size of the JSON text it came from (0 when built from host values).
    bytes: usize,
    /// Nesting of the globals object (the object itself is level 1).
    depth: usize,
    /// `backends` typed, for the request handle's routing step: built on
    /// first use.
    backends: OnceLock<Result<Vec<BackendStatus>, String>>,
}

impl Globals {
    /// The `backends` global, typed (built once, on first use).
    pub fn backends(&self) -> Result<&[BackendStatus], Failure> {
        let typed = self.backends.get_or_init(|| match self.globals.get("backends") {
            Some(b) => BackendStatus::list_from_json(b),
            None => Err("the globals have no backends".to_owned()),
        });
        match typed {
            Ok(list) => Ok(list),
            Err(e) => Err(Failure::invalid(format!("globals: {e}"))),
        }
    }

    /// Parse the JSON text of a globals object (`{"backends": ..., ...}`).
    pub fn parse(text: &[u8]) -> Result<Globals, Failure> {
        match parse_text(text, MAX_DEPTH + 1, "json")? {
            Value::Object(map) => Globals::from_map(map, text.len()),
            other => Err(Failure::invalid(format!(
                "json must be a JSON object of the hook's globals, got {}",
                type_name(&other)
            ))),
        }
    }

    /// Build from a parsed globals object; `bytes` is the size of the text
    /// it came from (0 if none). `request` may not be one of them: it goes
    /// in a [`Request`].
    pub fn from_map(mut map: Map<String, Value>, bytes: usize) -> Result<Globals, Failure> {
        if map.contains_key("request") {
            return Err(Failure::invalid(
                "globals: 'request' is not a global here: pass it as a request handle (llmp_request_new)",
            ));
        }
        let depth = 1 + map.values().map(convert::json_depth).max().unwrap_or(0);
        if depth > MAX_DEPTH + 1 {
            return Err(Failure::invalid(format!(
                "globals: nesting is {depth} levels, deeper than any limit ({MAX_DEPTH})"
            )));
        }
        let response = match map.remove("response") {
            Some(r) => Some(ResponseInfo::from_json(&r).map_err(Failure::invalid)?),
            None => None,
        };
        Ok(Globals {
            globals: HookGlobals::new(map),
            response,
            bytes,
            depth,
            backends: OnceLock::new(),
        })
    }
}

/// Why [`request_handle`] made no handle.
#[derive(Debug)]
pub enum Refused {
    /// The host's fields are wrong (a bug of the host).
    Fields(Failure),
    /// The client's body is refused: the 400 the host answers, as the
    /// gateway answers it.
    Body(GatewayError),
}

impl From<Failure> for Refused {
    fn from(f: Failure) -> Refused {
        Refused::Fields(f)
    }
}

impl From<Refused> for Failure {
    fn from(r: Refused) -> Failure {
        match r {
            Refused::Fields(f) => f,
            Refused::Body(e) => Failure::invalid(e.message),
        }
    }
}

/// A request handle over `request`'s fields (without a body) and the
/// client's `body` as it came, parsed here as the gateway parses it
/// (`fields::parse_request_body`). `method`: the request's, when the host
/// hands every request to a handle (an API call is a `POST` to an API
/// path, any other is relayed as is); `None` when only API calls are
/// (then `path` must be an API endpoint's).
pub fn request_handle(
    engine: &Engine,
    request: Request,
    body: &[u8],
    method: Option<&str>,
) -> Result<RequestHandle, Refused> {
    let mut info = request.info;
    if !info.body.is_null() {
        return Err(Failure::invalid(
            "request: the body goes apart, as the client's bytes, not in the request's fields",
        )
        .into());
    }
    // The path in core's canonical form: endpoints match on it, scripts
    // see it, and it is what the host sends upstream (`llmp_handle_path`).
    if let Some(raw) = info.path.take() {
        let canonical =
            llmproxy_core::http::path::canonical(&raw).map_err(|e| Refused::Body(GatewayError::invalid_path(e)))?;
        info.path = Some(canonical);
    }
    let path = info.path.as_deref().unwrap_or_default();
    let api = match method {
        Some(m) => Api::of_request(m, path),
        None => Some(Api::from_path(path).ok_or_else(|| {
            Failure::invalid("request: `path` must be /v1/chat/completions, /v1/completions or /v1/embeddings")
        })?),
    };
    info.body = fields::parse_request_body(api, body, engine.config())
        .map_err(Refused::Body)?
        .into();
    Ok(RequestHandle::new(info, api))
}

/// Run `hook` on prepared inputs: check them against the hook's limits,
/// then [`Engine::run_parts`]. The result is validated against the hook's
/// contract, as by `run_json`.
pub fn run(
    engine: &Engine,
    hook: &str,
    request: Option<&Request>,
    globals: Option<&Globals>,
) -> Result<Value, Failure> {
    let (hook, cfg) = enabled(engine, hook)?;
    let empty;
    let globals = match globals {
        Some(g) => g,
        None => {
            empty = Globals::default();
            &empty
        }
    };
    let limits = &cfg.limits;
    let too_big = |what: &str, n: usize, limit: usize| {
        Failure::from(
            HookError::bad_input(format!("{what} is {n}, over the limit of {limit}")).at(hook, &cfg.script.name),
        )
    };
    if let Some(r) = request {
        // The request object sits one level below the globals object.
        if r.depth > limits.max_depth {
            return Err(too_big("request nesting (levels)", r.depth, limits.max_depth));
        }
        if r.raw_body_depth > limits.max_depth {
            return Err(too_big(
                "request.body_raw nesting (levels)",
                r.raw_body_depth,
                limits.max_depth,
            ));
        }
        if r.raw_body_bytes > limits.max_input_bytes {
            return Err(too_big(
                "request.body_raw size (bytes)",
                r.raw_body_bytes,
                limits.max_input_bytes,
            ));
        }
    }
    if globals.depth > limits.max_depth + 1 {
        return Err(too_big("globals nesting (levels)", globals.depth, limits.max_depth + 1));
    }
    let bytes = globals.bytes + request.map_or(0, |r| r.bytes);
    if bytes > limits.max_input_bytes {
        return Err(too_big("input size (bytes)", bytes, limits.max_input_bytes));
    }
    Ok(engine.run_parts(
        hook,
        request.map(Request::info),
        globals.response.as_ref(),
        &globals.globals,
    )?)
}

/// JSON text within `max_depth` levels and [`MAX_BYTES`].
fn parse_text(text: &[u8], max_depth: usize, what: &str) -> Result<Value, Failure> {
    let limits = Limits {
        max_depth,
        max_bytes: MAX_BYTES,
    };
    convert::parse_json(text, limits).map_err(|e| Failure::invalid(format!("{what}: {e}")))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// Handles are shared between threads by C and Go hosts.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Request>();
    assert_send_sync::<Globals>();
};
