//! What an error handler's result becomes: the body a host sends as JSON
//! text, whatever form the script gave it, the status and header changes,
//! and the results refused.

mod common;

use common::engine;

use llmproxy_core::hooks::{ErrorInfo, ErrorInput, ErrorResponse, HeaderChange, RequestInfo};
use serde_json::{json, Value};

/// A custom error response as (status, body, header changes); `None` for
/// the gateway's default.
type Handled = Option<(u16, Value, Vec<(String, HeaderChange)>)>;

/// What `script`, as the error handler, makes of a backend failure; or
/// the error's message.
fn handled(script: &str) -> Result<Handled, String> {
    let engine = engine("error_handler", script);
    let request = RequestInfo::default();
    let error = ErrorInfo {
        kind: "backend_error".into(),
        message: "boom".into(),
        status_code: 502,
        backend_url: None,
        retry_count: 0,
    };
    match engine.handle_error(&ErrorInput {
        request: &request,
        error: &error,
    }) {
        Ok(ErrorResponse::Default) => Ok(None),
        Ok(ErrorResponse::Custom {
            status_code,
            body,
            headers,
        }) => {
            let body = serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON: {e}"))?;
            Ok(Some((status_code, body, headers)))
        }
        Err(e) => Err(e.message),
    }
}

#[test]
fn the_body_is_json_text_whatever_form_the_script_gave() {
    let retry = vec![("Retry-After".to_owned(), HeaderChange::Set("5".into()))];
    let cases = [
        ("return nil", None),
        (
            "return {body = {error = {message = 'x', code = 7}}}",
            Some((502, json!({"error": {"code": 7, "message": "x"}}), vec![])),
        ),
        (
            "return {status_code = 429, body = 'slow down'}",
            Some((429, json!("slow down"), vec![])),
        ),
        ("return {body = json.null}", Some((502, Value::Null, vec![]))),
        (
            "return {body = {list = {1, 2.5, 'three'}, empty = {}}, headers = {['Retry-After'] = '5'}}",
            Some((502, json!({"empty": {}, "list": [1, 2.5, "three"]}), retry)),
        ),
        (
            "local b = {error = {type = error.type}} return {status_code = 503, body = b}",
            Some((503, json!({"error": {"type": "backend_error"}}), vec![])),
        ),
    ];
    for (script, want) in cases {
        assert_eq!(handled(script), Ok(want), "{script}");
    }
}

#[test]
fn results_without_a_body_or_with_a_bad_status_are_refused() {
    let cases = [
        ("return {status_code = 503}", "'body' is required"),
        ("return {status_code = 103, body = {}}", "status_code"),
        ("return 'text'", "must return a table"),
    ];
    for (script, want) in cases {
        match handled(script) {
            Err(message) => assert!(message.contains(want), "{script}: {message}"),
            other => panic!("{script}: expected an error, got {other:?}"),
        }
    }
}
