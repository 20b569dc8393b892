//! What a finished request is charged, from the backend's usage and the
//! usage hook's record: every host's quota charge, tokens-per-minute charge,
//! ledger columns and usage metrics come from [`charge`], so the gateway
//! (`proxy/src/gateway/admission.rs`) and the nginx module
//! (`llmproxy.usage_charge`) bill the same request the same way.
//!
//! - **Quota**: the record's `billable_tokens`, else the backend's
//!   `total_tokens`.
//! - **Tokens per minute**: the backend's `total_tokens`, whatever the
//!   script billed (the limit is on what the backend produced).
//! - **Ledger columns** `prompt_tokens`, `completion_tokens`,
//!   `total_tokens`: the record's value where the record has the field,
//!   else the backend's; `cost`: the record's.
//! - **Metrics**: each of `prompt_tokens`, `completion_tokens`,
//!   `total_tokens` and `cost` the record has as a finite number >= 0 (a
//!   counter never goes down, whatever a backend reports), and
//!   `billable_tokens`.
//!
//! Token counts are whole numbers: rounded, and 0 for anything that is not
//! a finite positive number.
//!
//! The record every host logs and stores in the ledger is [`record_json`]'s
//! text of the script's record, else of the backend's usage ([`zero_usage`]
//! when it reported none).

use serde_json::Value;

/// The usage kinds counted per backend, besides `billable_tokens`.
pub const METRIC_KINDS: [&str; 4] = ["prompt_tokens", "completion_tokens", "total_tokens", "cost"];

/// The metric kind of the tokens charged to the key's quota (the last of
/// [`Charge::metrics`]).
pub const BILLABLE_KIND: &str = "billable_tokens";

/// What one request is charged.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// Tokens charged to the key's quota.
    pub billable_tokens: u64,
    /// Tokens charged to the key's tokens-per-minute limit.
    pub limit_tokens: u64,
    /// The ledger's `prompt_tokens`.
    pub prompt_tokens: u64,
    /// The ledger's `completion_tokens`.
    pub completion_tokens: u64,
    /// The ledger's `total_tokens`.
    pub total_tokens: u64,
    /// The record's `cost`.
    pub cost: Option<f64>,
    /// Usage metric samples: (kind, value).
    pub metrics: Vec<(&'static str, f64)>,
}

/// Where [`charge`] reads a record's fields: a whole record as a value,
/// or a script's record by the fields it kept ([`crate::hooks::CustomRecord`]).
pub trait RecordFields {
    /// Field `key`: `None` when the record lacks it, else its value as a
    /// number (`None` when it is not one: `Value::as_f64`).
    fn number(&self, key: &str) -> Option<Option<f64>>;
}

impl RecordFields for Value {
    fn number(&self, key: &str) -> Option<Option<f64>> {
        crate::small_object::get(self, key).map(Value::as_f64)
    }
}

/// The charge of a request whose backend reported `raw` and whose usage
/// hook recorded `record` (`None` when the hook is off, returned nil or
/// failed: the raw usage is the record). Of `record` only its billing
/// fields are read ([`RecordFields`]).
pub fn charge(raw: &Value, record: Option<&dyn RecordFields>) -> Charge {
    let number = |v: &dyn RecordFields, k: &str| v.number(k).flatten();
    let billable = match record {
        Some(r) => number(r, "billable_tokens").or_else(|| number(raw, "total_tokens")),
        None => number(raw, "total_tokens"),
    };
    let record = record.unwrap_or(raw);
    let pick = |k: &str| match record.number(k) {
        Some(v) => whole(v),
        None => whole(number(raw, k)),
    };
    let billable_tokens = whole(billable);
    let mut metrics: Vec<(&'static str, f64)> = METRIC_KINDS
        .iter()
        .filter_map(|k| {
            number(record, k)
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(|v| (*k, v))
        })
        .collect();
    metrics.push((BILLABLE_KIND, billable_tokens as f64));
    Charge {
        billable_tokens,
        limit_tokens: whole(number(raw, "total_tokens")),
        prompt_tokens: pick("prompt_tokens"),
        completion_tokens: pick("completion_tokens"),
        total_tokens: pick("total_tokens"),
        cost: number(record, "cost"),
        metrics,
    }
}

/// The usage of an answer that reported none (and of a request no backend
/// answered).
pub fn zero_usage() -> Value {
    serde_json::json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
}

/// The usage record as every host logs it and the ledger stores it: JSON
/// text with the keys of every object sorted, so the same record reads the
/// same in every host whatever order a backend or a script wrote it in.
pub fn record_json(record: &Value) -> String {
    // JSON text: UTF-8 by construction.
    String::from_utf8(crate::convert::sorted_json(record)).unwrap_or_default()
}

/// A token count: rounded, 0 unless finite and positive.
fn whole(v: Option<f64>) -> u64 {
    match v {
        // Rounded and positive: the cast saturates at u64::MAX.
        Some(x) if x.is_finite() && x > 0.0 => x.round() as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared cases (`conformance/usage-charges.json`; nginx runs them
    /// through `llmproxy.usage_charge` in `t/001-llmproxy-module.t`).
    #[test]
    fn every_host_charges_the_same() {
        let doc: Value =
            serde_json::from_str(include_str!("../../../conformance/usage-charges.json")).expect("usage-charges.json");
        let cases = doc["cases"].as_array().expect("cases");
        assert!(cases.len() >= 5);
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let record = Some(&case["record"]).filter(|r| !r.is_null());
            let got = charge(&case["raw"], record.map(|r| r as &dyn RecordFields));
            let want = &case["charge"];
            let count = |k: &str| want[k].as_u64().expect(k);
            assert_eq!(got.billable_tokens, count("billable_tokens"), "{name}");
            assert_eq!(got.limit_tokens, count("limit_tokens"), "{name}");
            assert_eq!(got.prompt_tokens, count("prompt_tokens"), "{name}");
            assert_eq!(got.completion_tokens, count("completion_tokens"), "{name}");
            assert_eq!(got.total_tokens, count("total_tokens"), "{name}");
            assert_eq!(got.cost, want["cost"].as_f64(), "{name}");
            let metrics: serde_json::Map<String, Value> = got
                .metrics
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
                .collect();
            let want_metrics = want["metrics"].as_object().expect("metrics");
            assert_eq!(metrics.len(), want_metrics.len(), "{name}: {metrics:?}");
            for (k, v) in want_metrics {
                assert_eq!(metrics.get(k).and_then(Value::as_f64), v.as_f64(), "{name}: {k}");
            }
        }
    }

    #[test]
    fn a_huge_billable_saturates() {
        let record = serde_json::json!({"billable_tokens": 1e30});
        assert_eq!(charge(&serde_json::json!({}), Some(&record)).billable_tokens, u64::MAX);
    }

    #[test]
    fn the_record_reads_the_same_whatever_the_order_it_was_written_in() {
        let record: Value =
            serde_json::from_str(r#"{"total_tokens":3,"extra":{"b":1,"a":[{"d":1,"c":2}]},"cost":0.5}"#)
                .expect("record");
        assert_eq!(
            record_json(&record),
            r#"{"cost":0.5,"extra":{"a":[{"c":2,"d":1}],"b":1},"total_tokens":3}"#
        );
        assert_eq!(
            record_json(&zero_usage()),
            r#"{"completion_tokens":0,"prompt_tokens":0,"total_tokens":0}"#
        );
    }

    #[test]
    fn the_record_text_is_what_sorting_a_copy_would_write() {
        let cases = [
            r#"{"z":"\u00e9\"\\\n","a":[1,2.5,-3e300,null,true,{"y":{},"x":[]}],"m":{"b":"x","a":{"d":1,"c":[]}}}"#,
            r#"[{"b":1,"a":2},"s",0]"#,
            r#""text""#,
            "1.0",
            "{}",
            r#"{"é":1,"e":2,"Z":3,"":4}"#,
        ];
        for case in cases {
            let v: Value = serde_json::from_str(case).expect(case);
            let mut sorted = v.clone();
            sorted.sort_all_objects();
            assert_eq!(record_json(&v), sorted.to_string(), "{case}");
        }
    }
}
