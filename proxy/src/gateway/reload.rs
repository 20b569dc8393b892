//! Hot reload (docs/adr/034): SIGHUP (wired by `llmproxy serve`), a change
//! of the config file, the keys file or a script file (modification times
//! polled every `reload.poll_ms`), and `POST /admin/reload` all re-read the
//! config file, compile a new engine and key set, and swap them in. A config
//! or script that fails to load is rejected with a log line and a metric;
//! the old generation keeps serving. Requests in flight (streams included)
//! finish on the generation they started with.
//!
//! What a reload changes: scripts and their settings, keys, limits, the
//! admin token (held to the admin token policy when the admin endpoints
//! are off loopback). What needs a restart: `listen`, `backends`,
//! `gateway`, `state`, `ledger`, `scripts.pool`, `reload` and
//! `admin.listen` / `admin.on_public_listener` (a reload that changes them
//! is applied for the rest and says so in the log).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use llmproxy_core::Config;
use tokio::task::JoinHandle;

use super::live::Live;
use super::Shared;

/// What triggered a reload (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// A watched file changed.
    Watch,
    /// `POST /admin/reload`.
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Watch => "file change",
            Trigger::Admin => "admin endpoint",
        }
    }
}

/// The result of a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new generation serves.
    Applied {
        /// Its number.
        generation: u64,
        /// Settings that changed but need a restart.
        needs_restart: Vec<&'static str>,
    },
    /// Rejected; the old generation serves.
    Rejected {
        /// Every problem found.
        problems: Vec<String>,
    },
}

/// Reload bookkeeping of a gateway.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    lock: tokio::sync::Mutex<()>,
    watch: bool,
    poll: Duration,
}

/// Modification time and size of each file, `None` when missing.
type Stamp = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (f.clone(), m)
        })
        .collect()
}

fn watched(config: &Config) -> Vec<PathBuf> {
    config
        .path
        .iter()
        .cloned()
        .chain(config.sources.iter().cloned())
        .collect()
}

/// Sections a reload cannot apply, by name, when they differ.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.listen != new.listen {
        v.push("listen");
    }
    if old.backends != new.backends {
        v.push("backends");
    }
    if old.gateway != new.gateway {
        v.push("gateway");
    }
    if old.state != new.state {
        v.push("state");
    }
    if old.ledger != new.ledger {
        v.push("ledger");
    }
    if old.pool != new.pool {
        v.push("scripts.pool");
    }
    if old.reload != new.reload {
        v.push("reload");
    }
    if old.admin.listen != new.admin.listen || old.admin.on_public_listener != new.admin.on_public_listener {
        v.push("admin.listen");
    }
    v
}

impl Reloader {
    /// Bookkeeping for a gateway started from `config`.
    pub fn new(config: &Config) -> Reloader {
        Reloader {
            path: config.path.clone(),
            lock: tokio::sync::Mutex::new(()),
            watch: config.reload.watch,
            poll: Duration::from_millis(config.reload.poll_ms),
        }
    }

    /// The config file reloads read.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }
}

impl Shared {
    /// Re-read the config file and swap in a new generation, or keep the
    /// current one and report why not.
    pub async fn reload(self: &Arc<Self>, trigger: Trigger) -> Outcome {
        let _one_at_a_time = self.reloader.lock.lock().await;
        let Some(path) = self.reloader.path.clone() else {
            return Outcome::Rejected {
                problems: vec![String::from("the gateway was not started from a config file")],
            };
        };
        let current = self.live();
        let generation = current.generation + 1;
        let metrics = Arc::clone(&self.metrics);
        let built = tokio::task::spawn_blocking(move || {
            let config = Config::from_file(&path).map_err(|e| e.problems)?;
            let old_path = config.path.clone();
            let live = Live::build(config, metrics, generation).map_err(|e| vec![e])?;
            Ok::<_, Vec<String>>((live, old_path))
        })
        .await;
        let live = match built {
            Ok(Ok((live, _))) => live,
            Ok(Err(problems)) => return self.rejected(trigger, problems, current.generation),
            Err(e) => return self.rejected(trigger, vec![format!("reload task failed: {e}")], current.generation),
        };
        if let Err(e) = super::exposure::check_token(&live.config().admin, self.admin_exposed) {
            return self.rejected(trigger, vec![e], current.generation);
        }
        let needs_restart = restart_only(current.config(), live.config());
        if let Err(e) = self.state.sync_keys(&live.keys).await {
            return self.rejected(
                trigger,
                vec![format!("cannot sync key usage with the state backend: {e}")],
                current.generation,
            );
        }
        let keys = live.keys.len();
        self.swap_live(live);
        self.metrics.reload(true, generation);
        tracing::info!(
            target: "llmproxy::reload",
            trigger = trigger.as_str(),
            generation,
            keys,
            needs_restart = ?needs_restart,
            "configuration reloaded"
        );
        if !needs_restart.is_empty() {
            tracing::warn!(
                target: "llmproxy::reload",
                sections = ?needs_restart,
                "these settings changed but take effect only after a restart"
            );
        }
        Outcome::Applied {
            generation,
            needs_restart,
        }
    }

    fn rejected(&self, trigger: Trigger, problems: Vec<String>, serving: u64) -> Outcome {
        self.metrics.reload(false, serving);
        tracing::error!(
            target: "llmproxy::reload",
            trigger = trigger.as_str(),
            generation = serving,
            problems = ?problems,
            "configuration rejected; the previous one keeps serving"
        );
        Outcome::Rejected { problems }
    }
}

/// Poll the watched files and reload when one changes (when the gateway
/// was started from a file and `reload.watch` is on).
pub fn spawn_watcher(shared: &Arc<Shared>) -> Option<JoinHandle<()>> {
    if !shared.reloader.watch || shared.reloader.path.is_none() {
        return None;
    }
    let shared = Arc::clone(shared);
    Some(tokio::spawn(async move {
        let mut files = watched(shared.live().config());
        let mut last = stamp(&files);
        loop {
            tokio::time::sleep(shared.reloader.poll).await;
            let now = stamp(&files);
            if now == last {
                continue;
            }
            // Let a writer finish (editors write in several steps).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let outcome = shared.reload(Trigger::Watch).await;
            if let Outcome::Applied { .. } = outcome {
                files = watched(shared.live().config());
            }
            // A rejected change is not retried until the files change again.
            last = stamp(&files);
        }
    }))
}
