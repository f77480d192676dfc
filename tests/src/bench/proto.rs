//! The sink protocol shared by `lg` and `sink` (included with `#[path]`).
//!
//! Every connection to the sink starts with a 9-byte request header the client
//! sends: one mode byte followed by a big-endian `u64` argument. The sink never
//! speaks first, so a proxy handshake can never be confused with sink data.
//!
//! | mode | argument | what the sink does |
//! |------|----------|--------------------|
//! | `D`  | N bytes  | download: writes N zero bytes (256 KiB writes), then closes |
//! | `U`  | N bytes  | upload: reads exactly N bytes, replies with the count it read as a `u64` BE, closes |
//! | `E`  | size hint| echo: writes back every byte it reads until EOF (the hint sizes its buffer) |
//! | `R`  | N bytes  | response: writes N zero bytes (a "small response", e.g. 1 KiB) and closes |

// Each binary that includes this file uses only part of it.
#![allow(dead_code)]

/// Length of the request header: mode byte + `u64` BE.
pub const HEADER_LEN: usize = 9;
/// Size of the sink's download writes and of `lg`'s bulk reads and writes.
pub const CHUNK: usize = 256 * 1024;

/// What a connection asks the sink to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Download(u64),
    Upload(u64),
    Echo(u64),
    Response(u64),
}

impl Request {
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let (mode, arg) = match self {
            Request::Download(n) => (b'D', n),
            Request::Upload(n) => (b'U', n),
            Request::Echo(n) => (b'E', n),
            Request::Response(n) => (b'R', n),
        };
        let mut out = [0u8; HEADER_LEN];
        out[0] = mode;
        out[1..].copy_from_slice(&arg.to_be_bytes());
        out
    }

    /// `None` for an unknown mode byte.
    pub fn decode(header: &[u8; HEADER_LEN]) -> Option<Request> {
        let mut arg = [0u8; 8];
        arg.copy_from_slice(&header[1..]);
        let arg = u64::from_be_bytes(arg);
        match header[0] {
            b'D' => Some(Request::Download(arg)),
            b'U' => Some(Request::Upload(arg)),
            b'E' => Some(Request::Echo(arg)),
            b'R' => Some(Request::Response(arg)),
            _ => None,
        }
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
/// Idle-connection tests hold ~10k sockets per process.
pub fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("warning: could not raise RLIMIT_NOFILE: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        for r in [
            Request::Download(1 << 30),
            Request::Upload(0),
            Request::Echo(65536),
            Request::Response(1024),
        ] {
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
        let mut bad = Request::Echo(1).encode();
        bad[0] = b'X';
        assert_eq!(Request::decode(&bad), None);
    }
}
