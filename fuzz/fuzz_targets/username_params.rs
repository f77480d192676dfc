//! Proxy usernames with routing parameters, over arbitrary bytes: as UTF-8
//! when they are, and lossily decoded either way (SOCKS5 and HTTP Basic
//! hand the proxy bytes; U+FFFD is one more non-ASCII character).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../control-plane/src/proxy/principal.rs"]
mod principal;

use principal::{MAX_USERNAME_LEN, ParamError, login_conflicts_with_params, parse_username};

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = std::str::from_utf8(data) {
        check(raw);
    }
    check(&String::from_utf8_lossy(data));
});

fn check(raw: &str) {
    match parse_username(raw) {
        Ok(p) => {
            assert!(raw.len() <= MAX_USERNAME_LEN);
            // The password is checked against a prefix of what was sent,
            // and one that customer creation would have accepted.
            assert!(!p.login.is_empty() && raw.starts_with(&p.login));
            assert!(!login_conflicts_with_params(&p.login));
            assert!(p.params.ttl.is_none() || p.params.session.is_some());
            // The canonical form is no longer and parses to the same value.
            let canonical = p.to_string();
            assert!(canonical.len() <= raw.len());
            assert_eq!(parse_username(&canonical).as_ref(), Ok(&p));
            assert_eq!(p.params.is_empty(), canonical == p.login);
        }
        Err(e) => {
            if raw.len() > MAX_USERNAME_LEN {
                assert_eq!(e, ParamError::TooLong { len: raw.len() });
            }
            // Messages reach customers and logs: bounded, no raw control
            // characters.
            let m = e.to_string();
            assert!(!m.is_empty() && m.len() < 600);
            assert!(!m.chars().any(char::is_control));
        }
    }
}
