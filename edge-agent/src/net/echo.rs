//! The public-address check: ask an IP-echo endpoint, through the exit's
//! uplink, which address it sees. Rotation is only a success when this
//! answer changed.

use std::net::IpAddr;
use std::time::Duration;

use super::http::{self, HttpError, Request};

#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("IP-echo request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: HttpError,
    },
    #[error("IP-echo endpoint {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("IP-echo endpoint {url} did not answer with an IP address: {body:?}")]
    NotAnIp { url: String, body: String },
}

/// The caller's address as the endpoint at `url` sees it, asked through
/// `interface` when given.
pub async fn external_ip(
    url: &str,
    interface: Option<&str>,
    timeout: Duration,
) -> Result<IpAddr, EchoError> {
    let req = Request {
        method: "GET",
        url,
        headers: &[
            ("Accept", "text/plain, application/json;q=0.9"),
            (
                "User-Agent",
                concat!("cellgate-edge-agent/", env!("CARGO_PKG_VERSION")),
            ),
        ],
        body: b"",
    };
    let response = http::send(req, interface, timeout)
        .await
        .map_err(|source| EchoError::Http {
            url: url.to_string(),
            source,
        })?;
    if response.status != 200 {
        return Err(EchoError::Status {
            url: url.to_string(),
            status: response.status,
        });
    }
    parse_echo_body(&response.body).ok_or_else(|| EchoError::NotAnIp {
        url: url.to_string(),
        body: String::from_utf8_lossy(&response.body[..response.body.len().min(80)]).into_owned(),
    })
}

/// The address in an echo body: the address alone (`203.0.113.7\n`), JSON
/// `{"ip": "…"}`, or an `ip=…` line (trace-style key/value bodies). An
/// IPv4-mapped IPv6 address is given back as IPv4.
pub fn parse_echo_body(body: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(body).ok()?.trim();
    let ip = if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else if text.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        v.get("ip")?.as_str()?.trim().parse().ok()?
    } else {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("ip="))?
            .trim()
            .parse()
            .ok()?
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn bodies() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        for body in [
            &b"203.0.113.7"[..],
            b" 203.0.113.7\r\n",
            b"{\"ip\": \"203.0.113.7\"}",
            b"{\"ip\":\"203.0.113.7\",\"country\":\"DE\"}\n",
            b"fl=1\nh=example\nip=203.0.113.7\nts=1\n",
            b"::ffff:203.0.113.7",
        ] {
            assert_eq!(parse_echo_body(body), Some(v4), "{body:?}");
        }
        assert_eq!(
            parse_echo_body(b"2001:db8::7\n"),
            Some("2001:db8::7".parse().unwrap())
        );
        for body in [
            &b""[..],
            b"<html>203.0.113.7</html>",
            b"{\"address\":\"203.0.113.7\"}",
            b"{\"ip\": 7}",
            b"203.0.113.777",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_echo_body(body), None, "{body:?}");
        }
    }

    async fn echo_server(reply: &'static [u8]) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await;
            let _ = s.write_all(reply).await;
        });
        url
    }

    #[tokio::test]
    async fn external_ip_and_its_errors() {
        let url = echo_server(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n198.51.100.9").await;
        assert_eq!(
            external_ip(&url, None, Duration::from_secs(5))
                .await
                .unwrap(),
            "198.51.100.9".parse::<IpAddr>().unwrap()
        );
        let url = echo_server(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n").await;
        let e = external_ip(&url, None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, EchoError::Status { status: 503, .. }), "{e}");
        let url = echo_server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
        let e = external_ip(&url, None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("\"hello\""), "{e}");
        let e = external_ip("https://echo.example/", None, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, EchoError::Http { .. }), "{e}");
    }
}
