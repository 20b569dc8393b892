//! The ledger row of a finished request, built the same way by every host:
//! what the request and its usage step say comes from core's types here;
//! the host adds only what it alone knows ([`Served`]).

use llmproxy_core::hooks::RequestInfo;
use llmproxy_core::policy::usage::{self, Charge};

use crate::LedgerRecord;

/// What the host that served a request knows of it and the request does
/// not say.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    /// The node that served it.
    pub node: &'a str,
    /// The fingerprint of the key it was admitted with.
    pub key_fp: Option<&'a str>,
    /// The backend that answered (none when no backend was reached).
    pub backend: Option<&'a str>,
    /// The status the client got (499: the client went away first).
    pub status: u16,
    /// Whether the answer was streamed.
    pub is_stream: bool,
    /// When the request completed (Unix milliseconds).
    pub answered_ms: i64,
    /// Time from request to completion, in milliseconds.
    pub latency_ms: f64,
    /// Whether `billable_tokens` is also added to the ledger's `key_usage`
    /// (the quota lives in the ledger, not in a shared store).
    pub charge_quota: bool,
}

/// What the request's usage step charged: its charge and its record's
/// text ([`usage::record_json`]).
#[derive(Debug, Clone, Copy)]
pub struct Charged<'a> {
    /// The charge ([`usage::charge`]).
    pub charge: &'a Charge,
    /// The record as logged.
    pub record_json: &'a str,
}

impl LedgerRecord {
    /// The row of `request`, charged `charged` (`None`: no usage step ran;
    /// the row records zero usage), as `served`.
    pub fn of(request: &RequestInfo, charged: Option<Charged<'_>>, served: Served<'_>) -> LedgerRecord {
        let zero;
        let zero_record;
        let Charged { charge, record_json } = match charged {
            Some(c) => c,
            None => {
                let usage = usage::zero_usage();
                zero = usage::charge(&usage, None);
                zero_record = usage::record_json(&usage);
                Charged {
                    charge: &zero,
                    record_json: &zero_record,
                }
            }
        };
        LedgerRecord {
            request_id: request.id.clone(),
            ts_ms: served.answered_ms,
            node: served.node.to_owned(),
            key_fp: served.key_fp.map(str::to_owned),
            user_id: request.user_id.clone(),
            backend: served.backend.map(str::to_owned),
            model: request.model().map(str::to_owned),
            path: request.path.clone().unwrap_or_default(),
            is_stream: served.is_stream,
            status: served.status,
            prompt_tokens: charge.prompt_tokens,
            completion_tokens: charge.completion_tokens,
            total_tokens: charge.total_tokens,
            billable_tokens: charge.billable_tokens,
            cost: charge.cost,
            latency_ms: served.latency_ms,
            record: record_json.to_owned(),
            charge_quota: served.charge_quota,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;

    fn request(body: Value) -> RequestInfo {
        RequestInfo {
            id: "req_1".into(),
            body: Arc::new(body),
            headers: Vec::new(),
            user_id: Some("u1".into()),
            api_key: Some("sk-secret".into()),
            client_ip: None,
            path: Some("/v1/chat/completions".into()),
            backend_url: None,
            extra: serde_json::Map::new(),
        }
    }

    const SERVED: Served<'static> = Served {
        node: "n1",
        key_fp: Some("fp1"),
        backend: Some("b1"),
        status: 200,
        is_stream: true,
        answered_ms: 1_000,
        latency_ms: 2.5,
        charge_quota: true,
    };

    #[test]
    fn a_row_takes_its_columns_from_the_request_the_charge_and_the_host() {
        let raw = serde_json::json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12});
        let record = serde_json::json!({"total_tokens": 12, "billable_tokens": 6, "cost": 0.25});
        let charge = usage::charge(&raw, Some(&record));
        let text = usage::record_json(&record);
        let charged = Charged {
            charge: &charge,
            record_json: &text,
        };
        let row = LedgerRecord::of(&request(serde_json::json!({"model": "gpt-4"})), Some(charged), SERVED);
        assert_eq!(
            row,
            LedgerRecord {
                request_id: "req_1".into(),
                ts_ms: 1_000,
                node: "n1".into(),
                key_fp: Some("fp1".into()),
                user_id: Some("u1".into()),
                backend: Some("b1".into()),
                model: Some("gpt-4".into()),
                path: "/v1/chat/completions".into(),
                is_stream: true,
                status: 200,
                prompt_tokens: 5,
                completion_tokens: 7,
                total_tokens: 12,
                billable_tokens: 6,
                cost: Some(0.25),
                latency_ms: 2.5,
                record: r#"{"billable_tokens":6,"cost":0.25,"total_tokens":12}"#.into(),
                charge_quota: true,
            }
        );
    }

    #[test]
    fn a_request_no_usage_step_ran_for_records_zero_usage() {
        // A `model` that is not a string is no model.
        let row = LedgerRecord::of(&request(serde_json::json!({"model": 4})), None, SERVED);
        assert_eq!(row.model, None);
        assert_eq!(
            (
                row.prompt_tokens,
                row.completion_tokens,
                row.total_tokens,
                row.billable_tokens,
                row.cost
            ),
            (0, 0, 0, 0, None)
        );
        assert_eq!(
            row.record,
            r#"{"completion_tokens":0,"prompt_tokens":0,"total_tokens":0}"#
        );
    }
}
