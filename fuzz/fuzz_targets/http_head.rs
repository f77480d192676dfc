//! HTTP proxy heads and chunked bodies over arbitrary bytes. Besides "no
//! panic", what we forward must parse back: a head we accept never turns
//! into a different or broken head on the other side.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../control-plane/src/proxy/http_head.rs"]
mod http_head;

use http_head::{ChunkedTracker, HeadError, MAX_HEAD_LEN, MAX_HEADERS, RequestTarget};

fuzz_target!(|data: &[u8]| {
    check_request(data);
    check_response(data);
    check_chunked(data);
});

fn check_request(data: &[u8]) {
    let head = match http_head::parse_request_head(data) {
        Ok(Some((head, n))) => {
            assert!(n <= data.len() && n <= MAX_HEAD_LEN);
            head
        }
        Ok(None) => {
            assert!(data.len() < MAX_HEAD_LEN);
            return;
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 431));
            return;
        }
    };
    let framing = http_head::request_body_framing(&head).expect("parse checked the framing");
    let _ = head.proxy_credentials();
    let _ = http_head::client_wants_keep_alive(&head);
    let out = http_head::encode_origin_request(&head);
    if let RequestTarget::Absolute { path_and_query, .. } = &head.target {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
        let mut req = httparse::Request::new(&mut fields);
        let parsed = req.parse(&out).expect("forwarded head parses");
        assert_eq!(parsed, httparse::Status::Complete(out.len()));
        assert_eq!(req.path, Some(path_and_query.as_str()));
        assert_eq!(req.method, Some(head.method.as_str()));
        // The origin must see the same body framing we follow.
        let te = req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
        let cl = req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("content-length"));
        match framing {
            http_head::BodyFraming::Chunked => assert!(te && !cl),
            http_head::BodyFraming::Length(_) => assert!(cl && !te),
            _ => assert!(!cl && !te),
        }
    }
}

fn check_response(data: &[u8]) {
    let Ok(Some((head, n))) = http_head::parse_response_head(data) else {
        return;
    };
    assert!(n <= data.len() && n <= MAX_HEAD_LEN);
    for method in ["GET", "HEAD", "CONNECT"] {
        let _ = http_head::response_body_framing(method, &head);
    }
    let out = http_head::encode_response_head_for_client(&head, data.len().is_multiple_of(2));
    // Our own `Connection` field may make it MAX_HEADERS + 1 fields.
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 1];
    let mut again = httparse::Response::new(&mut fields);
    let parsed = again.parse(&out).expect("forwarded head parses");
    assert_eq!(parsed, httparse::Status::Complete(out.len()));
    assert_eq!(again.code, Some(head.status));
    let _ = http_head::simple_response(head.status, &head.reason, &[("X", &head.reason)], "");
}

/// Feeding the input at once and in two pieces must agree.
fn check_chunked(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut whole = ChunkedTracker::new();
    let one: Result<usize, HeadError> = whole.feed(data);
    let mut parts = ChunkedTracker::new();
    let two = parts.feed(&data[..split]).and_then(|a| {
        if parts.is_done() {
            Ok(a)
        } else {
            parts.feed(&data[split..]).map(|b| a + b)
        }
    });
    match (one, two) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b);
            assert_eq!(whole.is_done(), parts.is_done());
            assert!(a <= data.len());
            if !whole.is_done() {
                assert_eq!(a, data.len());
            }
        }
        (Err(_), Err(_)) => {}
        (one, two) => panic!("split changed the outcome: {one:?} vs {two:?}"),
    }
}
