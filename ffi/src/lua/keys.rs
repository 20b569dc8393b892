//! The config's key store and the standard checks, for the Lua module
//! (docs/adr/028): `engine:key(api_key)`, the request handle's `h:auth`
//! and `h:rate_limit`, `engine:admission()`. The checks and denials are core's
//! (`llmproxy_core::keys`), so nginx and the standalone gateway agree.

use chrono::Utc;
use llmproxy_core::clock::Zone;
use llmproxy_core::hooks::{KeyInfo, StandardChecks};
use llmproxy_core::keys::{identifies_caller, standard_checks_with_usage, KeyIndex, KeyRecord};
use llmproxy_core::{Config, HookName};
use serde_json::Value as Json;

/// One configured key: its record, its fingerprint and its `key_info`.
pub(crate) struct KeyEntry {
    pub record: KeyRecord,
    pub fingerprint: String,
    pub info: Json,
}

/// The keys of one engine's config, found by the secret a client presents
/// whether the config holds it in clear or as `key_sha256` (core's
/// [`KeyIndex`]).
#[derive(Default)]
pub(crate) struct KeyStore {
    entries: Vec<KeyEntry>,
    index: KeyIndex,
}

impl KeyStore {
    pub fn new(config: &Config) -> KeyStore {
        let entries = config
            .keys
            .iter()
            .map(|record| KeyEntry {
                fingerprint: record.fingerprint(),
                info: record.key_info(record.used_quota),
                record: record.clone(),
            })
            .collect();
        KeyStore {
            entries,
            index: KeyIndex::new(&config.keys),
        }
    }

    pub fn get(&self, key: &str) -> Option<&KeyEntry> {
        self.index.find(key).and_then(|i| self.entries.get(i))
    }

    /// Every key's fingerprint and configured `used_quota`.
    pub fn quota_keys(&self) -> Vec<(String, u64)> {
        self.entries
            .iter()
            .map(|e| (e.fingerprint.clone(), e.record.used_quota))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// What the admission hooks of a request that presented `key` (or none)
/// from `client_ip` see: the key's record as `key_info` with its live
/// usage (`null` when the key is unknown) and the standard checks.
pub(crate) fn admission_input(
    store: &KeyStore,
    key: Option<&str>,
    client_ip: Option<&str>,
    used_quota: u64,
) -> (Json, StandardChecks) {
    let entry = key.and_then(|k| store.get(k));
    let checks = standard_checks_with_usage(entry.map(|e| &e.record), used_quota, client_ip, Utc::now());
    (info_with_usage(entry, used_quota), checks)
}

/// The `key_info` of the key a request presented, with its live usage;
/// `null` when the key is unknown.
pub(crate) fn key_info(store: &KeyStore, key: Option<&str>, used_quota: u64) -> Json {
    info_with_usage(key.and_then(|k| store.get(k)), used_quota)
}

/// `entry`'s `key_info` with `used_quota` as its usage; `null` for none.
fn info_with_usage(entry: Option<&KeyEntry>, used_quota: u64) -> Json {
    entry.map_or(Json::Null, |e| KeyInfo::live(&e.info, used_quota).to_json())
}

/// A quota count from Lua: a finite positive number, else 0.
pub(crate) fn quota_units(n: Option<f64>) -> u64 {
    n.filter(|u| u.is_finite() && *u > 0.0).map_or(0, |u| u as u64)
}

/// Whether a request that presented `key` (or none) from `client_ip` comes
/// from an identified caller (core's `keys::identifies_caller`).
pub(crate) fn identified(store: &KeyStore, key: Option<&str>, client_ip: Option<&str>) -> bool {
    let record = key.and_then(|k| store.get(k)).map(|e| &e.record);
    identifies_caller(record, client_ip, Utc::now())
}

/// What admission runs for this config, as the gateway decides it
/// (proxy/src/gateway/live.rs): auth when keys are configured or an auth
/// script is enabled, the limiter when a limit is set or a rate_limit
/// script is enabled.
#[derive(Clone, Copy)]
pub(crate) struct Admission {
    pub auth_on: bool,
    pub limit_on: bool,
    pub zone: Zone,
}

pub(crate) fn admission(config: &Config, enabled: impl Fn(HookName) -> bool) -> Admission {
    Admission {
        auth_on: config.keys_configured || enabled(HookName::Auth),
        limit_on: config.limits.any() || enabled(HookName::RateLimit),
        zone: config.limits.zone().unwrap_or(Zone::Local),
    }
}
