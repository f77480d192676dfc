//! Async AT client: one command at a time over any byte stream (a serial
//! port on a device, `tokio::io::duplex` in tests).
//!
//! Every command has a deadline. A command that times out leaves the client
//! usable: its late answer is recognised as stale before the next command
//! is sent and never taken for that command's answer.

use std::collections::VecDeque;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};

use super::codec::{Decoder, Event, Response};

/// Longest command line accepted.
pub const MAX_COMMAND: usize = 256;
/// URCs kept for [`AtClient::take_urcs`]; older ones are dropped.
pub const MAX_KEPT_URCS: usize = 32;
/// After a timeout, how long the line must stay quiet before the next
/// command goes out, and the most spent waiting for that.
const SETTLE_QUIET: Duration = Duration::from_millis(100);
const SETTLE_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum AtError {
    #[error("no answer to {command} within {} ms", .after.as_millis())]
    Timeout { command: String, after: Duration },
    #[error("serial I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the port closed")]
    Closed,
    #[error("refusing to send {command:?}: {why}")]
    InvalidCommand { command: String, why: &'static str },
}

/// Check a command line before it goes to the modem: `AT…`, printable
/// ASCII, bounded, no line terminator of its own.
pub fn check_command(command: &str) -> Result<(), &'static str> {
    if command.len() > MAX_COMMAND {
        return Err("longer than 256 characters");
    }
    if !command
        .get(..2)
        .is_some_and(|p| p.eq_ignore_ascii_case("AT"))
    {
        return Err("does not start with AT");
    }
    if !command.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("contains control or non-ASCII characters");
    }
    Ok(())
}

pub struct AtClient<T> {
    io: T,
    decoder: Decoder,
    urcs: VecDeque<String>,
    /// A command was given up on: its answer may still arrive.
    unsettled: bool,
    buf: Box<[u8; 512]>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> AtClient<T> {
    pub fn new(io: T) -> Self {
        AtClient {
            io,
            decoder: Decoder::new(),
            urcs: VecDeque::new(),
            unsettled: false,
            buf: Box::new([0; 512]),
        }
    }

    /// Send `command` and collect its response until a final result code,
    /// for at most `limit`. A non-`OK` final result is a [`Response`], not
    /// an error: the caller decides what an `ERROR` means.
    pub async fn command(&mut self, command: &str, limit: Duration) -> Result<Response, AtError> {
        check_command(command).map_err(|why| AtError::InvalidCommand {
            command: command.to_string(),
            why,
        })?;
        let deadline = Instant::now() + limit;
        let result = match timeout_at(deadline, self.exchange(command)).await {
            Ok(r) => r,
            Err(_) => Err(AtError::Timeout {
                command: command.to_string(),
                after: limit,
            }),
        };
        if result.is_err() {
            let partial = self.decoder.abandon();
            if !partial.is_empty() {
                tracing::debug!(command, ?partial, "partial answer dropped");
            }
            self.unsettled = true;
        }
        result
    }

    /// Unsolicited result codes seen so far (at most [`MAX_KEPT_URCS`]).
    pub fn take_urcs(&mut self) -> Vec<String> {
        self.urcs.drain(..).collect()
    }

    pub fn into_inner(self) -> T {
        self.io
    }

    async fn exchange(&mut self, command: &str) -> Result<Response, AtError> {
        self.settle().await?;
        self.decoder.begin(command);
        let mut line = Vec::with_capacity(command.len() + 1);
        line.extend_from_slice(command.as_bytes());
        line.push(b'\r');
        self.io.write_all(&line).await?;
        self.io.flush().await?;
        loop {
            let n = self.io.read(&mut self.buf[..]).await?;
            if n == 0 {
                return Err(AtError::Closed);
            }
            if let Some(r) = self.absorb(n) {
                return Ok(r);
            }
        }
    }

    /// Feed `n` bytes from the buffer to the decoder; returns the response
    /// if they completed it (events after it are still handled).
    fn absorb(&mut self, n: usize) -> Option<Response> {
        let mut events = Vec::new();
        self.decoder.feed(&self.buf[..n], &mut events);
        let mut response = None;
        for ev in events {
            match ev {
                Event::Response(r) => response = Some(r),
                Event::Unsolicited(u) => {
                    tracing::debug!(urc = %u, "unsolicited");
                    if self.urcs.len() == MAX_KEPT_URCS {
                        self.urcs.pop_front();
                    }
                    self.urcs.push_back(u);
                }
                Event::Stray(r) => tracing::debug!(result = %r, "stale final result dropped"),
                Event::Overlong => tracing::warn!("overlong line from the modem dropped"),
            }
        }
        response
    }

    /// Consume input that predates the next command: whatever is already
    /// buffered and, after a command was given up on, whatever arrives
    /// until the line has been quiet for a moment.
    async fn settle(&mut self) -> Result<(), AtError> {
        while let Some(r) = self.io.read(&mut self.buf[..]).now_or_never() {
            match r? {
                0 => return Err(AtError::Closed),
                n => {
                    self.absorb(n);
                }
            }
        }
        if self.unsettled {
            let until = Instant::now() + SETTLE_MAX;
            while Instant::now() < until {
                match timeout(SETTLE_QUIET, self.io.read(&mut self.buf[..])).await {
                    Err(_) => break,
                    Ok(r) => match r? {
                        0 => return Err(AtError::Closed),
                        n => {
                            self.absorb(n);
                        }
                    },
                }
            }
            self.unsettled = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotate::at::codec::{CmeError, FinalResult};
    use tokio::io::{DuplexStream, duplex};
    use tokio::time::sleep;

    /// What the fake modem does with one command.
    #[derive(Clone)]
    enum Reply {
        /// Write these bytes at once.
        Bytes(&'static [u8]),
        /// Write these bytes one at a time, pausing between them.
        Slow(&'static [u8], Duration),
        /// Write these chunks with a pause before each.
        Chunks(Vec<(&'static [u8], Duration)>),
        /// Say nothing.
        Silent,
    }

    /// A scripted modem on the far end of a duplex pipe: reads one command
    /// line per entry in `script`, checks it, and answers as told.
    fn fake_modem(script: Vec<(&'static str, Reply)>) -> DuplexStream {
        let (near, mut far) = duplex(4096);
        tokio::spawn(async move {
            let mut pending = Vec::new();
            for (expected, reply) in script {
                let line = loop {
                    if let Some(i) = pending.iter().position(|&b| b == b'\r') {
                        let line: Vec<u8> = pending.drain(..=i).collect();
                        break String::from_utf8_lossy(&line[..i]).to_string();
                    }
                    let mut b = [0u8; 256];
                    match far.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&b[..n]),
                    }
                };
                assert_eq!(line, expected, "the modem got an unexpected command");
                match reply {
                    Reply::Bytes(b) => far.write_all(b).await.unwrap(),
                    Reply::Slow(b, gap) => {
                        for byte in b {
                            sleep(gap).await;
                            far.write_all(&[*byte]).await.unwrap();
                        }
                    }
                    Reply::Chunks(chunks) => {
                        for (b, gap) in chunks {
                            sleep(gap).await;
                            far.write_all(b).await.unwrap();
                        }
                    }
                    Reply::Silent => {}
                }
            }
            // Keep the line open until the client goes away.
            let mut b = [0u8; 64];
            while let Ok(n) = far.read(&mut b).await {
                if n == 0 {
                    break;
                }
            }
        });
        near
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn normal_response() {
        let io = fake_modem(vec![(
            "AT+CSQ",
            Reply::Bytes(b"\r\n+CSQ: 23,99\r\n\r\nOK\r\n"),
        )]);
        let mut c = AtClient::new(io);
        let r = c.command("AT+CSQ", T).await.unwrap();
        assert_eq!(r.result, FinalResult::Ok);
        assert_eq!(r.lines, vec!["+CSQ: 23,99"]);
    }

    #[tokio::test]
    async fn urc_in_the_middle_of_a_response() {
        let io = fake_modem(vec![(
            "AT+COPS?",
            Reply::Bytes(b"\r\n+CREG: 5\r\n\r\n+COPS: 0,0,\"Telia\",7\r\n\r\nRING\r\n\r\nOK\r\n"),
        )]);
        let mut c = AtClient::new(io);
        let r = c.command("AT+COPS?", T).await.unwrap();
        assert_eq!(r.lines, vec!["+COPS: 0,0,\"Telia\",7"]);
        assert_eq!(c.take_urcs(), vec!["+CREG: 5", "RING"]);
    }

    #[tokio::test]
    async fn cme_error() {
        let io = fake_modem(vec![(
            "AT+CGACT=1,1",
            Reply::Bytes(b"\r\n+CME ERROR: 30\r\n"),
        )]);
        let mut c = AtClient::new(io);
        let r = c.command("AT+CGACT=1,1", T).await.unwrap();
        assert_eq!(r.result, FinalResult::CmeError(CmeError::Code(30)));
        assert_eq!(r.result.to_string(), "+CME ERROR: 30 (no network service)");
    }

    #[tokio::test]
    async fn timeout_then_next_command_works() {
        let io = fake_modem(vec![
            ("AT+CSQ", Reply::Silent),
            ("AT", Reply::Bytes(b"\r\nOK\r\n")),
        ]);
        let mut c = AtClient::new(io);
        let limit = Duration::from_millis(300);
        let started = Instant::now();
        let err = c.command("AT+CSQ", limit).await.unwrap_err();
        assert!(matches!(err, AtError::Timeout { .. }), "{err}");
        assert_eq!(err.to_string(), "no answer to AT+CSQ within 300 ms");
        assert!(started.elapsed() >= limit && started.elapsed() < limit * 5);
        let r = c.command("AT", T).await.unwrap();
        assert_eq!(r.result, FinalResult::Ok);
    }

    #[tokio::test]
    async fn late_answer_is_not_taken_for_the_next_one() {
        // The modem answers AT+COPS? after the client gave up, then answers
        // AT+CSQ; the late OK must not end AT+CSQ early.
        let late = Duration::from_millis(400);
        let io = fake_modem(vec![
            (
                "AT+COPS?",
                Reply::Chunks(vec![(b"\r\n+COPS: 0,0,\"Late\",7\r\n\r\nOK\r\n", late)]),
            ),
            ("AT+CSQ", Reply::Bytes(b"\r\n+CSQ: 9,99\r\n\r\nOK\r\n")),
        ]);
        let mut c = AtClient::new(io);
        assert!(
            c.command("AT+COPS?", Duration::from_millis(100))
                .await
                .is_err()
        );
        // The late answer arrives while nothing is in flight.
        sleep(late).await;
        let r = c.command("AT+CSQ", T).await.unwrap();
        assert_eq!(r.lines, vec!["+CSQ: 9,99"]);
    }

    #[tokio::test]
    async fn split_lines() {
        let ms = Duration::from_millis(30);
        let io = fake_modem(vec![(
            "AT+CGPADDR=1",
            Reply::Chunks(vec![
                (b"\r", ms),
                (b"\n+CGPAD", ms),
                (b"DR: 1,\"10.1", ms),
                (b"0.0.1\"\r", ms),
                (b"\n\r\nO", ms),
                (b"K\r", ms),
                (b"\n", ms),
            ]),
        )]);
        let mut c = AtClient::new(io);
        let r = c.command("AT+CGPADDR=1", T).await.unwrap();
        assert_eq!(r.lines, vec!["+CGPADDR: 1,\"10.10.0.1\""]);
        assert_eq!(r.result, FinalResult::Ok);
    }

    #[tokio::test]
    async fn slow_reply_one_byte_per_50ms() {
        let io = fake_modem(vec![(
            "AT+CSQ",
            Reply::Slow(b"\r\n+CSQ: 17,99\r\n\r\nOK\r\n", Duration::from_millis(50)),
        )]);
        let mut c = AtClient::new(io);
        let r = c.command("AT+CSQ", T).await.unwrap();
        assert_eq!(r.lines, vec!["+CSQ: 17,99"]);
    }

    #[tokio::test]
    async fn slow_reply_past_the_deadline_times_out_then_recovers() {
        let gap = Duration::from_millis(20);
        let io = fake_modem(vec![
            ("AT+CSQ", Reply::Slow(b"\r\n+CSQ: 17,99\r\n\r\nOK\r\n", gap)),
            ("AT", Reply::Bytes(b"\r\nOK\r\n")),
        ]);
        let mut c = AtClient::new(io);
        let err = c
            .command("AT+CSQ", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, AtError::Timeout { .. }));
        // Once the rest of the slow answer has trickled in, the next
        // command still gets its own answer.
        sleep(gap * 30).await;
        let r = c.command("AT", T).await.unwrap();
        assert_eq!(r.result, FinalResult::Ok);
        assert!(r.lines.is_empty());
    }

    #[tokio::test]
    async fn garbage_bytes() {
        let io = fake_modem(vec![(
            "ATI",
            Reply::Bytes(b"\x00\xff\xfe\x80\r\n\x00Quectel\r\nEC25\x00\r\n\xc3(\r\nOK\r\n"),
        )]);
        let mut c = AtClient::new(io);
        let r = c.command("ATI", T).await.unwrap();
        assert_eq!(r.result, FinalResult::Ok);
        assert!(r.lines.contains(&"Quectel".to_string()));
        assert!(r.lines.contains(&"EC25".to_string()));
    }

    #[tokio::test]
    async fn closed_port() {
        let (near, far) = duplex(64);
        drop(far);
        let mut c = AtClient::new(near);
        let err = c.command("AT", T).await.unwrap_err();
        assert!(matches!(err, AtError::Closed | AtError::Io(_)), "{err}");
    }

    #[tokio::test]
    async fn invalid_commands_are_refused() {
        let (near, _far) = duplex(64);
        let mut c = AtClient::new(near);
        for bad in ["AT+CSQ\r\nATD123;", "ATI\n", "+CSQ", "AT+CÖPS", ""] {
            assert!(
                matches!(c.command(bad, T).await, Err(AtError::InvalidCommand { .. })),
                "{bad:?}"
            );
        }
    }
}
