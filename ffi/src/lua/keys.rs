//! The config's key store and the standard checks, for the Lua module
//! (docs/adr/028): `engine:key(api_key)`, `engine:standard_checks(...)`,
//! `engine:admission()`. The checks and denials are core's
//! (`llmproxy_core::keys`), so nginx and the standalone gateway agree.

use chrono::Utc;
use llmproxy_core::clock::Zone;
use llmproxy_core::hooks::StandardChecks;
use llmproxy_core::keys::{standard_checks_with_usage, standard_denial, KeyIndex, KeyRecord};
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

/// The standard checks of a request that presented `key` (or none), with
/// the key's live usage, and the standard denial: status, message and the
/// gateway's error code (proxy/src/gateway/admission.rs `denial_reason`).
pub(crate) fn checks(
    store: &KeyStore,
    key: Option<&str>,
    client_ip: Option<&str>,
    used_quota: u64,
) -> (StandardChecks, Option<(u16, &'static str, &'static str)>) {
    let record = key.and_then(|k| store.get(k)).map(|e| &e.record);
    let c = standard_checks_with_usage(record, used_quota, client_ip, Utc::now());
    let denial = standard_denial(&c).map(|(status, message)| (status, message, denial_code(&c)));
    (c, denial)
}

fn denial_code(c: &StandardChecks) -> &'static str {
    if !c.key_valid {
        "invalid_api_key"
    } else if !c.status_active {
        "key_disabled"
    } else if !c.not_expired {
        "key_expired"
    } else if !c.ip_allowed {
        "ip_not_allowed"
    } else {
        "quota_exhausted"
    }
}

/// What admission runs for this config, as the gateway decides it
/// (proxy/src/gateway/live.rs): auth when keys are configured or an auth
/// script is enabled, the limiter when a limit is set or a rate_limit
/// script is enabled.
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
