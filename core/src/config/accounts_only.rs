//! The account sections of a config read on their own (`keys`,
//! `keys_file`, `state`, `ledger`): what the operator's commands
//! (`llmproxy keys`, `llmproxy usage`) need. No script is read or
//! compiled and no other section is looked at, so a key can be disabled
//! while a broken script keeps the full config from loading (the incident
//! the key is being disabled for).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    resolve_accounts, AccountSections, AdminConfig, LedgerConfig, LimitsConfig, RawLedger, ReloadConfig, StateConfig,
};
use crate::error::ConfigError;
use crate::keys::KeyRecord;

/// The account sections of a config, validated as [`super::Config`]
/// validates them.
#[derive(Debug, Clone)]
pub struct AccountsConfig {
    /// API keys from `keys:` and `keys_file:`, in that order.
    pub keys: Vec<KeyRecord>,
    /// The `keys_file`, resolved against the config's directory.
    pub keys_file: Option<PathBuf>,
    /// Where limiter and quota counters live (`state:`).
    pub state: StateConfig,
    /// The usage ledger (`ledger:`); `None` when absent or disabled.
    pub ledger: Option<LedgerConfig>,
}

/// Only the sections read here; every other key (scripts, backends, ...)
/// is ignored, not validated.
#[derive(Debug, Default, Deserialize)]
struct RawAccounts {
    keys: Option<Vec<KeyRecord>>,
    keys_file: Option<String>,
    #[serde(default)]
    state: StateConfig,
    ledger: Option<RawLedger>,
}

impl AccountsConfig {
    /// Read the account sections of the config file at `path`
    /// (`keys_file` and `ledger.path` are relative to it).
    pub fn from_file(path: impl AsRef<Path>) -> Result<AccountsConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read config: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        AccountsConfig::from_yaml(&text, &base)
    }

    /// Read the account sections of YAML text; paths are relative to
    /// `base_dir`.
    pub fn from_yaml(text: &str, base_dir: &Path) -> Result<AccountsConfig, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let raw: RawAccounts =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::one(super::yaml_error::describe(&e)))?;
        let mut problems = Vec::new();
        let accounts = resolve_accounts(
            AccountSections {
                keys: raw.keys,
                keys_file: raw.keys_file,
                limits: &LimitsConfig::default(),
                state: &raw.state,
                ledger: raw.ledger,
                admin: &AdminConfig::default(),
                reload: &ReloadConfig::default(),
            },
            base_dir,
            &mut problems,
        );
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(AccountsConfig {
            keys: accounts.keys,
            keys_file: accounts.keys_file,
            state: super::StateConfig {
                tls_ca_file: accounts.state_tls_ca,
                ..raw.state
            },
            ledger: accounts.ledger,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_script_or_unknown_section_does_not_matter() {
        let yaml = "keys: [{key: sk-a, user_id: a}]\nledger: {path: u.db}\n\
                    scripts:\n  auth: {script: \"return (\"}\nbackends: [{name: b, url: nope}]\nwhatever: 1\n";
        let a = AccountsConfig::from_yaml(yaml, Path::new("/base")).unwrap();
        assert_eq!(a.keys.len(), 1);
        assert_eq!(a.ledger.unwrap().path, Path::new("/base/u.db"));
        assert!(crate::Config::from_yaml(yaml, Path::new("/base")).is_err());
    }

    #[test]
    fn the_account_sections_are_still_validated() {
        let e = AccountsConfig::from_yaml(
            "keys: [{key: sk-a, user_id: a}, {key: sk-a, user_id: b}]\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(
            e.problems.iter().any(|p| p.contains("already defined")),
            "{:?}",
            e.problems
        );
        let e = AccountsConfig::from_yaml("state: {backend: redis}\n", Path::new(".")).unwrap_err();
        assert!(
            e.problems.iter().any(|p| p.starts_with("state.url")),
            "{:?}",
            e.problems
        );
    }
}
