//! The API keys a gateway accepts, indexed by the secret the client sends.
//!
//! Built from the config's `keys:` and `keys_file:` (core's
//! [`KeyRecord`]s) each time the config is (re)loaded; a request looks its
//! key up once. Each entry keeps its `key_info` record ready for the `auth`
//! and `rate_limit` scripts, which read the live `used_quota` in its place
//! (core's [`KeyInfo`]): a request copies nothing of it.

use std::sync::Arc;

use hyper::header::HeaderMap;
use llmproxy_core::hooks::KeyInfo;
use llmproxy_core::keys::{KeyIndex, KeyRecord};
use serde_json::Value;

/// One configured key.
#[derive(Debug)]
pub struct KeyEntry {
    /// The record as configured (`used_quota` is the configured starting
    /// value; the state backend counts the live one).
    pub record: KeyRecord,
    /// `sha256:` + 12 hex digits: what logs and the ledger show.
    pub fingerprint: Arc<str>,
    /// The record as scripts see it ([`KeyRecord::key_info`]).
    info: Value,
}

impl KeyEntry {
    /// Build an entry for `record` (its `key_info` is core's
    /// [`KeyRecord::key_info`], as in every host).
    pub fn new(record: KeyRecord) -> KeyEntry {
        let info = record.key_info(record.used_quota);
        KeyEntry {
            fingerprint: Arc::from(record.fingerprint()),
            record,
            info,
        }
    }

    /// The `key_info` global: the seed's fields with `used_quota` = `used`.
    pub fn key_info(&self, used: u64) -> KeyInfo<'_> {
        KeyInfo::live(&self.info, used)
    }
}

/// The keys of one config generation.
#[derive(Debug, Default)]
pub struct KeySet {
    index: KeyIndex,
    ordered: Vec<Arc<KeyEntry>>,
}

impl KeySet {
    /// Index `keys`, held in clear or as `key_sha256` (core's
    /// [`KeyIndex`]; the config has rejected duplicates already).
    pub fn new(keys: &[KeyRecord]) -> KeySet {
        let ordered: Vec<Arc<KeyEntry>> = keys.iter().cloned().map(|k| Arc::new(KeyEntry::new(k))).collect();
        KeySet {
            index: KeyIndex::new(keys),
            ordered,
        }
    }

    /// The entry for the secret `key`.
    pub fn get(&self, key: &str) -> Option<Arc<KeyEntry>> {
        self.index.find(key).and_then(|i| self.ordered.get(i)).cloned()
    }

    /// Every entry, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.ordered.iter()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}

/// The API key of a request (core's rule,
/// [`llmproxy_core::http::client::api_key`]; a header sent twice presents
/// nothing, [`llmproxy_core::http::client::sole`]). A value that is not
/// text presents no key.
pub fn presented_key(headers: &HeaderMap) -> Option<String> {
    use llmproxy_core::http::client::{api_key, sole};
    let text = |name: &str| sole(headers.get_all(name).iter().map(|v| v.to_str().unwrap_or_default()));
    api_key(text("authorization"), text("x-api-key")).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn record(key: &str) -> KeyRecord {
        serde_json::from_value(serde_json::json!({
            "key": key, "user_id": "u1", "name": "测试用户", "total_quota": 100000,
            "used_quota": 50000, "allowed_ips": ["192.168.1.0/24"], "expires_at": "2026-12-31T23:59:59Z"
        }))
        .unwrap()
    }

    #[test]
    fn key_info_has_the_seed_fields_and_the_live_usage() {
        let set = KeySet::new(&[record("sk-xxx")]);
        let e = set.get("sk-xxx").unwrap();
        let info = e.key_info(50_123).to_json();
        for f in [
            "key",
            "user_id",
            "name",
            "status",
            "total_quota",
            "used_quota",
            "allowed_ips",
            "expires_at",
        ] {
            assert!(info.get(f).is_some(), "{f}: {info}");
        }
        assert_eq!(info["used_quota"], 50_123);
        assert_eq!(info["status"], "active");
        assert!(set.get("sk-yyy").is_none());
        assert!(e.fingerprint.starts_with("sha256:"));
    }

    #[test]
    fn hashed_keys_are_found_and_show_no_secret() {
        let set = KeySet::new(&[record("sk-plain"), record("sk-hashed").hashed()]);
        let plain = set.get("sk-plain").unwrap();
        let hashed = set.get("sk-hashed").unwrap();
        assert_eq!(*hashed.fingerprint, *llmproxy_core::keys::key_fingerprint("sk-hashed"));
        let info = hashed.key_info(1).to_json();
        assert!(info.get("key").is_none() && info["key_sha256"].is_string(), "{info}");
        assert_eq!(plain.key_info(1).to_json()["key"], "sk-plain");
        assert!(set.get("sk-nope").is_none());
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static(" sk-b "));
        assert_eq!(presented_key(&h).as_deref(), Some("sk-b"));
        h.insert("authorization", HeaderValue::from_static("Bearer sk-a"));
        assert_eq!(presented_key(&h).as_deref(), Some("sk-a"));
        // Sent twice: neither Bearer token is used (x-api-key still is).
        h.append("authorization", HeaderValue::from_static("Bearer sk-c"));
        assert_eq!(presented_key(&h).as_deref(), Some("sk-b"));
        h.append("x-api-key", HeaderValue::from_static("sk-d"));
        assert_eq!(presented_key(&h), None);
    }
}
