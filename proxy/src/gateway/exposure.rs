//! Which listener exposes the admin endpoints beyond loopback, and the
//! admin token policy applied to it (core's
//! [`llmproxy_core::admin::exposed_token_problem`], docs/adr/038).

use std::net::{IpAddr, SocketAddr};

use llmproxy_core::config::AdminConfig;

/// Whether only this host can reach `ip` (127.0.0.0/8, ::1, and their
/// IPv4-mapped forms). `0.0.0.0` and `::` are every interface: not loopback.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The first listener serving the admin endpoints that is not loopback:
/// the admin listener, or the public one with `admin.on_public_listener`.
pub fn exposed_admin(admin: &AdminConfig, public: SocketAddr, admin_addr: Option<SocketAddr>) -> Option<SocketAddr> {
    admin_addr
        .into_iter()
        .chain(admin.on_public_listener.then_some(public))
        .find(|a| !is_loopback(a.ip()))
}

/// Refuse an example or short `admin.token` when the admin endpoints are
/// reachable from other hosts at `exposed`.
pub fn check_token(admin: &AdminConfig, exposed: Option<SocketAddr>) -> Result<(), String> {
    let (Some(addr), Some(token)) = (exposed, admin.token.as_deref()) else {
        return Ok(());
    };
    match llmproxy_core::admin::exposed_token_problem(token) {
        None => Ok(()),
        Some(why) => Err(format!(
            "admin.token: {why}; the admin endpoint listens on {addr}, which is not a loopback address: \
             set a random token of at least {} bytes (e.g. `openssl rand -hex 24`) or bind admin.listen to 127.0.0.1",
            llmproxy_core::admin::MIN_EXPOSED_TOKEN_BYTES
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(token: &str, on_public: bool) -> AdminConfig {
        AdminConfig {
            token: Some(token.to_owned()),
            listen: None,
            on_public_listener: on_public,
        }
    }

    #[test]
    fn only_listeners_off_loopback_need_a_strong_token() {
        let lo: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:8001".parse().unwrap();
        let v6any: SocketAddr = "[::]:8001".parse().unwrap();
        // (public, admin listener, on_public_listener, exposed)
        let cases = [
            (any, None, false, None),
            (any, Some(lo), false, None),
            (lo, Some(mapped), false, None),
            (lo, Some(v6any), false, Some(v6any)),
            (any, Some(lo), true, Some(any)),
            (lo, None, true, None),
        ];
        for (public, admin_addr, on_public, want) in cases {
            let a = admin("change-me", on_public);
            let got = exposed_admin(&a, public, admin_addr);
            assert_eq!(got, want, "{public} {admin_addr:?} {on_public}");
            assert_eq!(check_token(&a, got).is_err(), want.is_some());
        }
        let e = check_token(&admin("change-me-admin-token", false), Some(any)).unwrap_err();
        assert!(
            e.starts_with("admin.token: 'change-me-admin-token' is an example token"),
            "{e}"
        );
        assert!(check_token(&admin("0123456789abcdef0123", false), Some(any)).is_ok());
        assert!(check_token(&AdminConfig::default(), Some(any)).is_ok());
    }
}
