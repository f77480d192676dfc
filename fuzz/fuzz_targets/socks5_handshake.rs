//! SOCKS5 handshake parsers over arbitrary bytes: each parser on the whole
//! input, then the three messages in order as a pipelining client would
//! send them.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../control-plane/src/proxy/socks5.rs"]
mod socks5;

use socks5::{MAX_MESSAGE, Reply, SocksError};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((g, n))) = socks5::parse_greeting(data) {
        assert!(n <= data.len() && n == 2 + g.methods.len());
        let m = socks5::select_method(&g);
        assert!(m == socks5::METHOD_USERPASS || m == socks5::NO_ACCEPTABLE_METHOD);
        let _ = socks5::encode_method_choice(m);
    }
    if let Ok(Some((up, n))) = socks5::parse_userpass(data) {
        assert!(n <= data.len() && n <= MAX_MESSAGE);
        assert_eq!(n, 3 + up.username.len() + up.password.len());
    }
    check_request(data);

    // Greeting, credentials and request back to back.
    let mut at = 0;
    let Ok(Some((_, n))) = socks5::parse_greeting(data) else {
        return;
    };
    at += n;
    let Ok(Some((_, n))) = socks5::parse_userpass(&data[at..]) else {
        return;
    };
    at += n;
    check_request(&data[at..]);
});

fn check_request(data: &[u8]) {
    match socks5::parse_request(data) {
        Ok(Some((req, n))) => {
            assert!(n <= data.len() && n <= MAX_MESSAGE);
            assert_ne!(req.target.port(), 0);
            assert_eq!(
                socks5::parse_request(&data[..n]),
                Ok(Some((req.clone(), n)))
            );
            let _ = req.command.code();
            if let shared::target::TargetAddr::Ip(sa) = req.target {
                let reply = socks5::encode_reply(Reply::Succeeded, Some(sa));
                assert_eq!(reply[1], 0);
            }
        }
        Ok(None) => assert!(data.len() < MAX_MESSAGE),
        Err(e) => {
            let reply = e.reply();
            if matches!(
                e,
                SocksError::UnknownCommand(_) | SocksError::UnsupportedAddressType(_)
            ) {
                assert!(reply.is_some());
            }
            let _ = socks5::encode_reply(reply.unwrap_or(Reply::GeneralFailure), None);
        }
    }
}
