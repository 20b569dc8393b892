//! Throttling of clients that keep presenting wrong credentials
//! (`gateway.auth_throttle`, docs/adr/039): the core's rule
//! (`llmproxy_core::policy::throttle`, nginx's too) over a map of buckets
//! per client address, one map per kind of credential.
//!
//! The map is bounded (`max_clients`): full buckets are dropped when it
//! fills up, and an address that still finds no room is not tracked (the
//! ones already throttled stay throttled). The lock is taken only while at
//! least one address is tracked.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use llmproxy_core::config::AuthThrottleConfig;
use llmproxy_core::policy::limits::Bucket;
use llmproxy_core::policy::metrics as catalog;
use llmproxy_core::policy::throttle::{client_key, Check, Throttle};

/// What the failed check was for (the `kind` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An API key on the public listener.
    ApiKey,
    /// The admin token of `/admin/*`.
    AdminToken,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::ApiKey => "api_key",
            Kind::AdminToken => "admin_token",
        }
    }
}

/// The failure buckets of one kind of credential.
#[derive(Debug)]
pub struct AuthThrottle {
    kind: Kind,
    rule: Throttle,
    /// Where the buckets' clock starts.
    origin: Instant,
    max_clients: usize,
    tracked: AtomicUsize,
    clients: Mutex<HashMap<IpAddr, Bucket>>,
    failures: AtomicU64,
    throttled: AtomicU64,
}

impl AuthThrottle {
    /// A throttle for `kind` with `config` (`max_failures` 0: never throttles).
    pub fn new(kind: Kind, config: &AuthThrottleConfig) -> AuthThrottle {
        AuthThrottle {
            kind,
            rule: Throttle::new(config),
            origin: Instant::now(),
            max_clients: config.max_clients.max(1),
            tracked: AtomicUsize::new(0),
            clients: Mutex::new(HashMap::new()),
            failures: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        }
    }

    /// Whole milliseconds on the throttle's clock (whole numbers keep the
    /// bucket arithmetic exact).
    fn ms(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.origin).as_millis() as f64
    }

    /// Seconds `ip` must wait before its next attempt, or `None` when it may
    /// try now. Counts the refusal in the metrics.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        if !self.rule.enabled() || self.tracked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let key = client_key(ip);
        match self.rule.check(clients.get_mut(&key), self.ms(now)) {
            Check::Pass => None,
            Check::Recovered => {
                clients.remove(&key);
                self.tracked.store(clients.len(), Ordering::Relaxed);
                None
            }
            Check::Wait(s) => {
                self.throttled.fetch_add(1, Ordering::Relaxed);
                Some(s)
            }
        }
    }

    /// `ip` failed a check.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if !self.rule.enabled() {
            return;
        }
        let key = client_key(ip);
        let now_ms = self.ms(now);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if !clients.contains_key(&key) && clients.len() >= self.max_clients {
            // Forget the clients that have recovered; if none has, this
            // one is not tracked.
            let rule = self.rule;
            clients.retain(|_, b| rule.check(Some(b), now_ms) != Check::Recovered);
            if clients.len() >= self.max_clients {
                tracing::warn!(
                    target: "llmproxy::gateway",
                    kind = self.kind.as_str(),
                    clients = clients.len(),
                    "auth throttle is full: a failing client is not tracked"
                );
                return;
            }
        }
        let b = self.rule.failed(clients.get(&key).copied(), now_ms);
        clients.insert(key, b);
        self.tracked.store(clients.len(), Ordering::Relaxed);
    }

    /// Append this throttle's samples (the HELP/TYPE lines come from
    /// [`render`]).
    fn samples(&self, out: &mut [String; 3]) {
        let k = self.kind.as_str();
        let _ = writeln!(
            out[0],
            "llmproxy_auth_failures_total{{kind=\"{k}\"}} {}",
            self.failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out[1],
            "llmproxy_auth_throttled_total{{kind=\"{k}\"}} {}",
            self.throttled.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out[2],
            "llmproxy_auth_throttle_clients{{kind=\"{k}\"}} {}",
            self.tracked.load(Ordering::Relaxed)
        );
    }
}

/// The throttles of a gateway: API keys and the admin token, counted apart
/// (a client locked out of the API may still reach a loopback admin).
#[derive(Debug)]
pub struct Throttles {
    /// Failed API key checks.
    pub api: AuthThrottle,
    /// Failed admin token checks.
    pub admin: AuthThrottle,
}

impl Throttles {
    /// Both throttles with `config`.
    pub fn new(config: &AuthThrottleConfig) -> Throttles {
        Throttles {
            api: AuthThrottle::new(Kind::ApiKey, config),
            admin: AuthThrottle::new(Kind::AdminToken, config),
        }
    }
}

/// Append the throttle metrics to the exposition text.
pub fn render(out: &mut String, t: &Throttles) {
    let mut parts: [String; 3] = Default::default();
    t.api.samples(&mut parts);
    t.admin.samples(&mut parts);
    let names = [
        "llmproxy_auth_failures_total",
        "llmproxy_auth_throttled_total",
        "llmproxy_auth_throttle_clients",
    ];
    for (name, samples) in names.iter().zip(parts) {
        if let Some(family) = catalog::find(name) {
            out.push_str(&catalog::header(family));
        }
        out.push_str(&samples);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn throttle(max: u32, window_s: u64, clients: usize) -> AuthThrottle {
        AuthThrottle::new(
            Kind::ApiKey,
            &AuthThrottleConfig {
                max_failures: max,
                window_s,
                max_clients: clients,
            },
        )
    }

    #[test]
    fn a_burst_of_failures_throttles_until_one_attempt_comes_back() {
        let t = throttle(3, 30, 10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(t.check(ip, t0), None);
            t.failed(ip, t0);
        }
        // One attempt comes back every 10 s.
        assert_eq!(t.check(ip, t0), Some(10));
        assert_eq!(t.check(ip, t0 + Duration::from_secs(4)), Some(6));
        assert_eq!(t.check(other, t0), None);
        assert_eq!(t.check(ip, t0 + Duration::from_secs(10)), None);
        t.failed(ip, t0 + Duration::from_secs(10));
        assert_eq!(t.check(ip, t0 + Duration::from_secs(10)), Some(10));
        assert_eq!(t.throttled.load(Ordering::Relaxed), 3);
        assert_eq!(t.failures.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn ipv6_clients_share_their_slash_64_and_mapped_ipv4_is_ipv4() {
        let t = throttle(1, 60, 10);
        let now = Instant::now();
        t.failed("2001:db8:1:2::1".parse().unwrap(), now);
        assert!(t.check("2001:db8:1:2:ffff::9".parse().unwrap(), now).is_some());
        assert!(t.check("2001:db8:1:3::1".parse().unwrap(), now).is_none());
        t.failed("::ffff:192.0.2.7".parse().unwrap(), now);
        assert!(t.check("192.0.2.7".parse().unwrap(), now).is_some());
    }

    #[test]
    fn the_map_is_bounded_and_recovered_clients_make_room() {
        let t = throttle(1, 10, 2);
        let now = Instant::now();
        let ips: Vec<IpAddr> = (1..=3).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        t.failed(ips[0], now);
        t.failed(ips[1], now);
        t.failed(ips[2], now); // no room: not tracked
        assert!(t.check(ips[0], now).is_some() && t.check(ips[1], now).is_some());
        assert!(t.check(ips[2], now).is_none());
        // After the window the first two have recovered and make room.
        let later = now + Duration::from_secs(11);
        t.failed(ips[2], later);
        assert!(t.check(ips[2], later).is_some());
        assert!(t.check(ips[0], later).is_none());
    }

    #[test]
    fn max_failures_zero_never_throttles() {
        let t = throttle(0, 60, 10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..100 {
            t.failed(ip, now);
        }
        assert_eq!(t.check(ip, now), None);
    }
}
