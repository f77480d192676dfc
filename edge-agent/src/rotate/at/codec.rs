//! AT dialogue codec: bytes in, lines and responses out. No I/O, no clock.
//!
//! A modem's AT port is a byte stream of lines. Three kinds of line share it:
//! - **final result codes** end the command in flight (`OK`, `ERROR`,
//!   `+CME ERROR: 30`, …);
//! - **information lines** belong to the command in flight (`+CSQ: 23,99`
//!   for `AT+CSQ`);
//! - **unsolicited result codes** (URCs: `+CEREG: 5`, `RING`, `+QIND: …`)
//!   can arrive at any time, also between two lines of a response.
//!
//! The rule that tells the last two apart: an information line belongs to
//! the response only if it starts with the command's own prefix (`+CSQ:` for
//! `AT+CSQ`), or if the command answers with bare lines (`ATI`, `AT+CGMM`)
//! and the line is not a well-known URC. A `+CREG:` line is therefore part
//! of the answer to `AT+CREG?` and a URC during any other command.
//!
//! Lines may end in `\r\n`, `\r` or `\n`; empty lines are skipped, so a
//! transcript split anywhere decodes the same as fed whole. The codec is
//! bounded: a line longer than [`MAX_LINE`] is dropped (reported as
//! [`Event::Overlong`]); a response keeps at most [`MAX_RESPONSE_LINES`]
//! lines and [`MAX_RESPONSE_BYTES`] bytes (the rest is dropped and the
//! response marked truncated). NULs and other control bytes are dropped;
//! invalid UTF-8 becomes U+FFFD. Nothing here panics on any input.

use std::fmt;

/// Longest line kept, in bytes (after control bytes are dropped).
pub const MAX_LINE: usize = 1024;
/// Most information lines kept for one response.
pub const MAX_RESPONSE_LINES: usize = 64;
/// Most bytes of information lines kept for one response.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024;

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinalResult {
    Ok,
    Error,
    CmeError(CmeError),
    /// `+CMS ERROR: …` (message service), kept as the modem wrote it.
    CmsError(String),
    NoCarrier,
    Busy,
    NoAnswer,
    NoDialtone,
    /// Huawei firmware answers unknown commands with `COMMAND NOT SUPPORT`.
    CommandNotSupported,
}

impl FinalResult {
    pub fn is_ok(&self) -> bool {
        matches!(self, FinalResult::Ok)
    }
}

impl fmt::Display for FinalResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FinalResult::Ok => f.write_str("OK"),
            FinalResult::Error => f.write_str("ERROR"),
            FinalResult::CmeError(e) => write!(f, "+CME ERROR: {e}"),
            FinalResult::CmsError(e) => write!(f, "+CMS ERROR: {e}"),
            FinalResult::NoCarrier => f.write_str("NO CARRIER"),
            FinalResult::Busy => f.write_str("BUSY"),
            FinalResult::NoAnswer => f.write_str("NO ANSWER"),
            FinalResult::NoDialtone => f.write_str("NO DIALTONE"),
            FinalResult::CommandNotSupported => f.write_str("COMMAND NOT SUPPORT"),
        }
    }
}

/// The argument of `+CME ERROR:`: a number (`AT+CMEE=1`) or the modem's
/// own text (`AT+CMEE=2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmeError {
    Code(u16),
    Text(String),
}

impl fmt::Display for CmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmeError::Code(n) => match cme_error_text(*n) {
                Some(text) => write!(f, "{n} ({text})"),
                None => write!(f, "{n}"),
            },
            CmeError::Text(t) => f.write_str(t),
        }
    }
}

/// Meaning of the common numeric `+CME ERROR` codes (3GPP TS 27.007 §9.2).
pub fn cme_error_text(code: u16) -> Option<&'static str> {
    Some(match code {
        0 => "phone failure",
        1 => "no connection to phone",
        2 => "phone adaptor link reserved",
        3 => "operation not allowed",
        4 => "operation not supported",
        5 => "PH-SIM PIN required",
        6 => "PH-FSIM PIN required",
        7 => "PH-FSIM PUK required",
        10 => "SIM not inserted",
        11 => "SIM PIN required",
        12 => "SIM PUK required",
        13 => "SIM failure",
        14 => "SIM busy",
        15 => "SIM wrong",
        16 => "incorrect password",
        17 => "SIM PIN2 required",
        18 => "SIM PUK2 required",
        20 => "memory full",
        21 => "invalid index",
        22 => "not found",
        23 => "memory failure",
        24 => "text string too long",
        25 => "invalid characters in text string",
        26 => "dial string too long",
        27 => "invalid characters in dial string",
        30 => "no network service",
        31 => "network timeout",
        32 => "network not allowed, emergency calls only",
        40 => "network personalisation PIN required",
        41 => "network personalisation PUK required",
        100 => "unknown",
        103 => "illegal MS",
        106 => "illegal ME",
        107 => "GPRS services not allowed",
        111 => "PLMN not allowed",
        112 => "location area not allowed",
        113 => "roaming not allowed in this location area",
        132 => "service option not supported",
        133 => "requested service option not subscribed",
        134 => "service option temporarily out of order",
        148 => "unspecified GPRS error",
        149 => "PDP authentication failure",
        150 => "invalid mobile class",
        _ => return None,
    })
}

/// The answer to one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Information lines, in order, URCs and echo removed.
    pub lines: Vec<String>,
    pub result: FinalResult,
    /// Lines were dropped because the response exceeded its bounds.
    pub truncated: bool,
}

/// What the decoder produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The command in flight finished.
    Response(Response),
    /// An unsolicited result code (or any line while no command is in
    /// flight, such as the late answer of a command given up on).
    Unsolicited(String),
    /// A final result code with no command in flight: the late end of a
    /// command given up on.
    Stray(FinalResult),
    /// A line longer than [`MAX_LINE`] was dropped.
    Overlong,
}

/// What a command's answer looks like, derived from the command text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The command as sent, for recognising its echo.
    command: String,
    /// `+CSQ:` for `AT+CSQ`, `^SYSCFGEX:` for `AT^SYSCFGEX?`.
    prefix: Option<String>,
    /// The command answers with lines that carry no prefix.
    bare: bool,
}

/// Extended commands whose answer is a bare line (`EC25`, not `+CGMM: EC25`).
const BARE_ANSWER: &[&str] = &[
    "+CGMI", "+CGMM", "+CGMR", "+CGSN", "+CIMI", "+GMI", "+GMM", "+GMR", "+GSN", "+QGMR",
];

impl Expect {
    pub fn for_command(command: &str) -> Expect {
        let command = command.trim().to_string();
        let body = strip_prefix_ci(&command, "AT").unwrap_or("");
        let (prefix, bare) = match body.chars().next() {
            // Extended syntax: `+NAME`, `^NAME`, `$NAME`, `%NAME`, `#NAME`,
            // `*NAME`, followed by `?`, `=…` or nothing.
            Some(c @ ('+' | '^' | '$' | '%' | '#' | '*')) => {
                let name_len = body[1..]
                    .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                    .unwrap_or(body.len() - 1);
                let name = body[1..1 + name_len].to_ascii_uppercase();
                let bare = c == '+' && BARE_ANSWER.contains(&format!("+{name}").as_str());
                (Some(format!("{c}{name}:")), bare)
            }
            // Basic syntax (`ATI`, `ATE0`, plain `AT`): bare answers.
            _ => (None, true),
        };
        Expect {
            command,
            prefix,
            bare,
        }
    }

    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }
}

/// Line prefixes (up to and including the colon) that are always URCs
/// unless they are the command's own prefix.
const URC_PREFIXES: &[&str] = &[
    "+CREG:",
    "+CGREG:",
    "+CEREG:",
    "+C5GREG:",
    "+CRING:",
    "+CLIP:",
    "+CCWA:",
    "+CMTI:",
    "+CMT:",
    "+CDS:",
    "+CDSI:",
    "+CBM:",
    "+CUSD:",
    "+CIEV:",
    "+CGEV:",
    "+CPIN:",
    "+CTZV:",
    "+CTZE:",
    "+CTZEU:",
    "+QIND:",
    "+QUSIM:",
    "+QSTAT:",
    "+QNETDEVSTATUS:",
    "+CNSMOD:",
    "+CPSI:",
    "+PACSP",
    "^RSSI:",
    "^HCSQ:",
    "^MODE:",
    "^BOOT:",
    "^SRVST:",
    "^SIMST:",
    "^RSSILVL:",
    "^HRSSILVL:",
    "^DSFLOWRPT:",
    "^NDISSTAT:",
    "^CEND:",
    "^ORIG:",
    "^CONF:",
    "^CONN:",
    "^STIN:",
    "^SYSSTART",
    "^ACTIVEBAND:",
];

/// Whole lines that are always URCs.
const URC_LINES: &[&str] = &[
    "RING",
    "RDY",
    "POWERED DOWN",
    "NORMAL POWER DOWN",
    "SMS DONE",
    "PB DONE",
    "CALL READY",
    "SMS READY",
];

/// Parse a final result code.
pub fn final_result(line: &str) -> Option<FinalResult> {
    let line = line.trim();
    if let Some(rest) = strip_prefix_ci(line, "+CME ERROR:") {
        let rest = rest.trim();
        return Some(FinalResult::CmeError(match rest.parse::<u16>() {
            Ok(n) => CmeError::Code(n),
            Err(_) => CmeError::Text(rest.to_string()),
        }));
    }
    if let Some(rest) = strip_prefix_ci(line, "+CMS ERROR:") {
        return Some(FinalResult::CmsError(rest.trim().to_string()));
    }
    let upper = line.to_ascii_uppercase();
    Some(match upper.as_str() {
        "OK" => FinalResult::Ok,
        "ERROR" => FinalResult::Error,
        "NO CARRIER" => FinalResult::NoCarrier,
        "BUSY" => FinalResult::Busy,
        "NO ANSWER" => FinalResult::NoAnswer,
        "NO DIALTONE" | "NO DIAL TONE" => FinalResult::NoDialtone,
        "COMMAND NOT SUPPORT" => FinalResult::CommandNotSupported,
        _ => return None,
    })
}

/// Whether a line is a well-known URC.
pub fn is_known_urc(line: &str) -> bool {
    let line = line.trim();
    URC_PREFIXES
        .iter()
        .any(|p| strip_prefix_ci(line, p).is_some())
        || URC_LINES.iter().any(|w| line.eq_ignore_ascii_case(w))
}

/// How one complete line relates to the command in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineKind {
    Final(FinalResult),
    /// The modem echoing the command back (`ATE1`).
    Echo,
    Info,
    Unsolicited,
}

/// Classify one line against the command in flight (`None`: nothing in
/// flight).
pub fn classify(line: &str, expect: Option<&Expect>) -> LineKind {
    if let Some(result) = final_result(line) {
        return LineKind::Final(result);
    }
    let Some(expect) = expect else {
        return LineKind::Unsolicited;
    };
    let trimmed = line.trim();
    if trimmed.eq_ignore_ascii_case(&expect.command) {
        return LineKind::Echo;
    }
    if let Some(prefix) = &expect.prefix
        && strip_prefix_ci(trimmed, prefix).is_some()
    {
        return LineKind::Info;
    }
    if is_known_urc(trimmed) {
        return LineKind::Unsolicited;
    }
    if expect.bare {
        LineKind::Info
    } else {
        LineKind::Unsolicited
    }
}

/// Case-insensitive ASCII `strip_prefix`.
pub fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

struct Pending {
    expect: Expect,
    lines: Vec<String>,
    bytes: usize,
    truncated: bool,
}

/// Incremental decoder for one AT port.
///
/// Call [`Decoder::begin`] before sending a command, feed every byte read
/// with [`Decoder::feed`], and [`Decoder::abandon`] when giving up on the
/// command (timeout). Bytes already buffered when a command begins belong to
/// what came before it and are never taken as its answer.
pub struct Decoder {
    line: Vec<u8>,
    /// The current line is longer than [`MAX_LINE`]: drop it up to the next
    /// terminator.
    overlong: bool,
    /// The current partial line started before the command in flight.
    line_predates: bool,
    pending: Option<Pending>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            line: Vec::new(),
            overlong: false,
            line_predates: false,
            pending: None,
        }
    }

    /// A command is about to be sent: lines from now on may be its answer.
    /// Replaces any command still in flight.
    pub fn begin(&mut self, command: &str) {
        self.pending = Some(Pending {
            expect: Expect::for_command(command),
            lines: Vec::new(),
            bytes: 0,
            truncated: false,
        });
        self.line_predates = !self.line.is_empty() || self.overlong;
    }

    /// Stop waiting for the command in flight; returns the information
    /// lines seen so far.
    pub fn abandon(&mut self) -> Vec<String> {
        self.pending.take().map(|p| p.lines).unwrap_or_default()
    }

    pub fn in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// Bytes held: the partial line plus the response being collected.
    /// Never more than [`MAX_LINE`] + [`MAX_RESPONSE_BYTES`].
    pub fn buffered(&self) -> usize {
        self.line.len() + self.pending.as_ref().map_or(0, |p| p.bytes)
    }

    /// Decode `bytes`, appending what they complete to `events`.
    pub fn feed(&mut self, bytes: &[u8], events: &mut Vec<Event>) {
        for &b in bytes {
            match b {
                b'\r' | b'\n' => self.end_line(events),
                // NULs and other control bytes are line noise.
                0x00..=0x08 | 0x0b..=0x0c | 0x0e..=0x1f | 0x7f => {}
                _ if self.overlong => {}
                _ if self.line.len() >= MAX_LINE => {
                    self.overlong = true;
                    self.line.clear();
                    events.push(Event::Overlong);
                }
                _ => self.line.push(b),
            }
        }
    }

    fn end_line(&mut self, events: &mut Vec<Event>) {
        let predates = std::mem::take(&mut self.line_predates);
        if std::mem::take(&mut self.overlong) {
            return;
        }
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line).trim().to_string();
        self.line.clear();
        if text.is_empty() {
            return;
        }
        let expect = if predates {
            None
        } else {
            self.pending.as_ref().map(|p| &p.expect)
        };
        match classify(&text, expect) {
            LineKind::Final(result) => match (predates, self.pending.take()) {
                (false, Some(p)) => events.push(Event::Response(Response {
                    lines: p.lines,
                    result,
                    truncated: p.truncated,
                })),
                (true, pending) => {
                    self.pending = pending;
                    events.push(Event::Stray(result));
                }
                (false, None) => events.push(Event::Stray(result)),
            },
            LineKind::Echo => {}
            LineKind::Info => {
                if let Some(p) = self.pending.as_mut() {
                    if p.lines.len() < MAX_RESPONSE_LINES
                        && p.bytes + text.len() <= MAX_RESPONSE_BYTES
                    {
                        p.bytes += text.len();
                        p.lines.push(text);
                    } else {
                        p.truncated = true;
                    }
                }
            }
            LineKind::Unsolicited => events.push(Event::Unsolicited(text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(command: Option<&str>, input: &[u8]) -> Vec<Event> {
        let mut d = Decoder::new();
        if let Some(c) = command {
            d.begin(c);
        }
        let mut events = Vec::new();
        d.feed(input, &mut events);
        events
    }

    fn response(lines: &[&str], result: FinalResult) -> Event {
        Event::Response(Response {
            lines: lines.iter().map(|s| s.to_string()).collect(),
            result,
            truncated: false,
        })
    }

    #[test]
    fn expect_prefixes() {
        assert_eq!(Expect::for_command("AT+CSQ").prefix(), Some("+CSQ:"));
        assert_eq!(Expect::for_command("AT+CREG?").prefix(), Some("+CREG:"));
        assert_eq!(
            Expect::for_command("AT+CGPADDR=1").prefix(),
            Some("+CGPADDR:")
        );
        assert_eq!(
            Expect::for_command("AT+QENG=\"servingcell\"").prefix(),
            Some("+QENG:")
        );
        assert_eq!(
            Expect::for_command("at^syscfgex?").prefix(),
            Some("^SYSCFGEX:")
        );
        assert_eq!(
            Expect::for_command("AT$QCRMCALL=1,1").prefix(),
            Some("$QCRMCALL:")
        );
        assert_eq!(Expect::for_command("ATI").prefix(), None);
        assert!(Expect::for_command("AT+CGMM").bare);
        assert!(!Expect::for_command("AT+CSQ").bare);
    }

    #[test]
    fn plain_response() {
        let ev = run(Some("AT+CSQ"), b"\r\n+CSQ: 23,99\r\n\r\nOK\r\n");
        assert_eq!(ev, vec![response(&["+CSQ: 23,99"], FinalResult::Ok)]);
    }

    #[test]
    fn echo_is_dropped() {
        let ev = run(Some("AT+CSQ"), b"AT+CSQ\r\r\n+CSQ: 5,99\r\n\r\nOK\r\n");
        assert_eq!(ev, vec![response(&["+CSQ: 5,99"], FinalResult::Ok)]);
    }

    #[test]
    fn urc_in_the_middle_of_a_response() {
        let ev = run(
            Some("AT+CGPADDR=1"),
            b"\r\n+CGPADDR: 1,\"10.0.0.7\"\r\n\r\n+CEREG: 5\r\n^RSSI:14\r\n\r\nOK\r\n",
        );
        assert_eq!(
            ev,
            vec![
                Event::Unsolicited("+CEREG: 5".into()),
                Event::Unsolicited("^RSSI:14".into()),
                response(&["+CGPADDR: 1,\"10.0.0.7\""], FinalResult::Ok),
            ]
        );
    }

    #[test]
    fn creg_is_the_answer_to_creg_query() {
        let ev = run(Some("AT+CREG?"), b"\r\n+CREG: 0,1\r\n\r\nOK\r\n");
        assert_eq!(ev, vec![response(&["+CREG: 0,1"], FinalResult::Ok)]);
        let ev = run(Some("AT+CSQ"), b"\r\n+CREG: 1\r\n+CSQ: 9,99\r\nOK\r\n");
        assert_eq!(
            ev,
            vec![
                Event::Unsolicited("+CREG: 1".into()),
                response(&["+CSQ: 9,99"], FinalResult::Ok)
            ]
        );
    }

    #[test]
    fn bare_answers() {
        let ev = run(
            Some("ATI"),
            b"\r\nQuectel\r\nEC25\r\n+QIND: SMS DONE\r\nRevision: EC25EFAR06A06M4G\r\n\r\nOK\r\n",
        );
        assert_eq!(
            ev,
            vec![
                Event::Unsolicited("+QIND: SMS DONE".into()),
                response(
                    &["Quectel", "EC25", "Revision: EC25EFAR06A06M4G"],
                    FinalResult::Ok
                ),
            ]
        );
        let ev = run(Some("AT+CGMM"), b"\r\nSIMCOM_SIM7600G-H\r\n\r\nOK\r\n");
        assert_eq!(ev, vec![response(&["SIMCOM_SIM7600G-H"], FinalResult::Ok)]);
        // A prefixed command does not take bare lines.
        let ev = run(Some("AT+CSQ"), b"RDY\r\n+CSQ: 1,99\r\nOK\r\n");
        assert_eq!(ev[0], Event::Unsolicited("RDY".into()));
    }

    #[test]
    fn error_codes() {
        let ev = run(Some("AT+CGACT=1,1"), b"\r\n+CME ERROR: 30\r\n");
        assert_eq!(
            ev,
            vec![response(&[], FinalResult::CmeError(CmeError::Code(30)))]
        );
        let Event::Response(r) = &ev[0] else { panic!() };
        assert_eq!(r.result.to_string(), "+CME ERROR: 30 (no network service)");
        let ev = run(Some("AT+CPIN?"), b"+CME ERROR: SIM not inserted\r\n");
        assert_eq!(
            ev,
            vec![response(
                &[],
                FinalResult::CmeError(CmeError::Text("SIM not inserted".into()))
            )]
        );
        assert_eq!(
            final_result("+CMS ERROR: 500"),
            Some(FinalResult::CmsError("500".into()))
        );
        assert_eq!(final_result("NO CARRIER"), Some(FinalResult::NoCarrier));
        assert_eq!(final_result("BUSY"), Some(FinalResult::Busy));
        assert_eq!(final_result("NO ANSWER"), Some(FinalResult::NoAnswer));
        assert_eq!(final_result("NO DIALTONE"), Some(FinalResult::NoDialtone));
        assert_eq!(
            final_result("COMMAND NOT SUPPORT"),
            Some(FinalResult::CommandNotSupported)
        );
        assert_eq!(final_result("OKAY"), None);
        assert_eq!(cme_error_text(10), Some("SIM not inserted"));
        assert_eq!(cme_error_text(100), Some("unknown"));
        assert_eq!(cme_error_text(9999), None);
    }

    #[test]
    fn framing_variants() {
        for input in [
            &b"+CSQ: 1,99\rOK\r"[..],
            b"+CSQ: 1,99\nOK\n",
            b"\n\r+CSQ: 1,99\n\rOK\n\r",
            b"\r\n\r\n+CSQ: 1,99\r\n\r\n\r\nOK\r\n",
        ] {
            assert_eq!(
                run(Some("AT+CSQ"), input),
                vec![response(&["+CSQ: 1,99"], FinalResult::Ok)]
            );
        }
    }

    #[test]
    fn nothing_in_flight() {
        let ev = run(None, b"\r\n+CEREG: 1\r\nOK\r\n");
        assert_eq!(
            ev,
            vec![
                Event::Unsolicited("+CEREG: 1".into()),
                Event::Stray(FinalResult::Ok)
            ]
        );
    }

    #[test]
    fn a_partial_line_from_before_the_command_is_not_its_answer() {
        let mut d = Decoder::new();
        let mut ev = Vec::new();
        // The late end of an abandoned command, cut in the middle.
        d.feed(b"\r\nO", &mut ev);
        d.begin("AT+CSQ");
        d.feed(b"K\r\n\r\n+CSQ: 3,99\r\n\r\nOK\r\n", &mut ev);
        assert_eq!(
            ev,
            vec![
                Event::Stray(FinalResult::Ok),
                response(&["+CSQ: 3,99"], FinalResult::Ok)
            ]
        );
    }

    #[test]
    fn garbage_bytes() {
        let ev = run(
            Some("AT+CSQ"),
            b"\x00\x00\xff\xfe\r\n+CSQ:\x00 7,99\r\n\xc3\x28junk\r\nOK\r\n",
        );
        let [garbage, junk, answer] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(garbage, &Event::Unsolicited("\u{fffd}\u{fffd}".into()));
        assert!(matches!(junk, Event::Unsolicited(s) if s.ends_with("(junk")));
        assert_eq!(answer, &response(&["+CSQ: 7,99"], FinalResult::Ok));
    }

    #[test]
    fn overlong_line_is_dropped() {
        let mut input = b"\r\n+CSQ: ".to_vec();
        input.extend(std::iter::repeat_n(b'9', 5000));
        input.extend_from_slice(b"\r\n+CSQ: 1,99\r\nOK\r\n");
        let ev = run(Some("AT+CSQ"), &input);
        assert_eq!(
            ev,
            vec![Event::Overlong, response(&["+CSQ: 1,99"], FinalResult::Ok)]
        );
    }

    #[test]
    fn response_is_bounded() {
        let mut input = Vec::new();
        for i in 0..200 {
            input.extend_from_slice(format!("line {i}\r\n").as_bytes());
        }
        input.extend_from_slice(b"OK\r\n");
        let ev = run(Some("ATI"), &input);
        let [Event::Response(r)] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(r.lines.len(), MAX_RESPONSE_LINES);
        assert!(r.truncated);
    }

    #[test]
    fn abandon_then_next_command() {
        let mut d = Decoder::new();
        let mut ev = Vec::new();
        d.begin("AT+COPS?");
        d.feed(b"\r\n+COPS: 0,0,\"X\",7\r\n", &mut ev);
        assert_eq!(d.abandon(), vec!["+COPS: 0,0,\"X\",7".to_string()]);
        assert!(!d.in_flight());
        d.feed(b"\r\nOK\r\n", &mut ev);
        d.begin("AT");
        d.feed(b"\r\nOK\r\n", &mut ev);
        assert_eq!(
            ev,
            vec![
                Event::Stray(FinalResult::Ok),
                response(&[], FinalResult::Ok)
            ]
        );
    }

    /// A transcript built from pieces a modem really sends.
    fn transcript() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"\r\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"+CSQ: 20,99".to_vec()),
            Just(b"+CEREG: 5".to_vec()),
            Just(b"RING".to_vec()),
            Just(b"OK".to_vec()),
            Just(b"ERROR".to_vec()),
            Just(b"+CME ERROR: 30".to_vec()),
            Just(b"AT+CSQ".to_vec()),
            Just(b"Quectel".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    fn decode_split(command: &str, input: &[u8], cuts: &[usize]) -> Vec<Event> {
        let mut d = Decoder::new();
        d.begin(command);
        let mut ev = Vec::new();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        for c in cuts {
            d.feed(&input[at..c], &mut ev);
            at = c;
        }
        d.feed(&input[at..], &mut ev);
        ev
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(
            input in proptest::collection::vec(any::<u8>(), 0..4096),
            command in prop_oneof![Just("AT+CSQ"), Just("ATI"), Just("AT+CREG?")],
        ) {
            let mut d = Decoder::new();
            d.begin(command);
            let mut ev = Vec::new();
            for chunk in input.chunks(97) {
                d.feed(chunk, &mut ev);
                prop_assert!(d.buffered() <= MAX_LINE + MAX_RESPONSE_BYTES);
            }
            for e in &ev {
                match e {
                    Event::Unsolicited(l) => prop_assert!(l.len() <= 3 * MAX_LINE),
                    Event::Response(r) => {
                        prop_assert!(r.lines.len() <= MAX_RESPONSE_LINES);
                        prop_assert!(r.lines.iter().map(String::len).sum::<usize>() <= MAX_RESPONSE_BYTES);
                    }
                    _ => {}
                }
            }
        }

        #[test]
        fn splitting_does_not_change_the_result(
            input in transcript(),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
            command in prop_oneof![Just("AT+CSQ"), Just("ATI"), Just("AT+CEREG?")],
        ) {
            let whole = decode_split(command, &input, &[]);
            let split = decode_split(command, &input, &cuts);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn one_byte_at_a_time_is_the_same(input in transcript()) {
            let whole = decode_split("AT+CSQ", &input, &[]);
            let cuts: Vec<usize> = (0..=input.len()).collect();
            prop_assert_eq!(whole, decode_split("AT+CSQ", &input, &cuts));
        }
    }
}
