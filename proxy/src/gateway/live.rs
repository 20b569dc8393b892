//! The part of a gateway that a reload replaces: the engine (scripts and
//! their settings), the key set and the limits, as one immutable snapshot.
//!
//! A request takes the snapshot current when it arrives and keeps it to its
//! end (streams included), so a reload never changes a request half-way
//! (docs/adr/034).

use std::sync::Arc;

use llmproxy_core::clock::Zone;
use llmproxy_core::config::LimitsConfig;
use llmproxy_core::{Config, Engine, HookName};

use super::keyset::KeySet;
use super::metrics::Metrics;
use super::pipeline::Stages;

/// One generation of the reloadable configuration.
#[derive(Debug)]
pub struct Live {
    /// Hook stages over this generation's engine.
    pub stages: Stages,
    /// This generation's API keys.
    pub keys: KeySet,
    /// Whether requests must pass the auth stage (keys configured, or an
    /// `auth` script).
    pub auth_on: bool,
    /// Whether requests must pass the rate limit stage (a limit set, or a
    /// `rate_limit` script).
    pub limit_on: bool,
    /// `limits.time_zone`: the zone of `current_time`.
    pub zone: Zone,
    /// 1 for the config the gateway started with, +1 per reload.
    pub generation: u64,
}

impl Live {
    /// Compile `config` into a snapshot (blocking: compiles every script).
    pub fn build(config: Config, metrics: Arc<Metrics>, generation: u64) -> Result<Live, String> {
        let keys = KeySet::new(&config.keys);
        let zone = config.limits.zone()?;
        for w in config.warnings() {
            tracing::warn!(target: "llmproxy::config", "{w}");
        }
        let keys_configured = config.keys_configured;
        let limits_any = config.limits.any();
        let engine = Engine::new(config).map_err(|e| e.to_string())?;
        let auth_on = keys_configured || engine.is_enabled(HookName::Auth);
        let limit_on = limits_any || engine.is_enabled(HookName::RateLimit);
        Ok(Live {
            stages: Stages::new(Arc::new(engine), metrics),
            keys,
            auth_on,
            limit_on,
            zone,
            generation,
        })
    }

    /// The config of this generation.
    pub fn config(&self) -> &Config {
        self.stages.engine().config()
    }

    /// The limits in force.
    pub fn limits(&self) -> &LimitsConfig {
        &self.config().limits
    }

    /// Whether a request goes through auth or rate limiting at all.
    pub fn admission_on(&self) -> bool {
        self.auth_on || self.limit_on
    }

    /// The admin token, if the admin endpoint is on.
    pub fn admin_token(&self) -> Option<&str> {
        self.config().admin.token.as_deref()
    }
}
