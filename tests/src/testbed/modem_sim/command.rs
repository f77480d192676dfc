//! From bytes to command lines, and from a command line to its commands.
//!
//! Pure and bounded: a line keeps at most [`MAX_LINE`] bytes (the rest is
//! dropped and the line answers `ERROR`, as a modem's command buffer does),
//! and nothing here panics on arbitrary input.

/// Longest command line kept, in bytes (V.250 asks for at least 40; real
/// modules accept a few hundred).
pub(super) const MAX_LINE: usize = 560;

/// One command line as typed: without its terminator.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Line {
    pub raw: Vec<u8>,
    /// The byte that ended the line (`\r`, or `\n` from sloppy hosts); echoed
    /// back as received.
    pub term: u8,
    /// The line was longer than [`MAX_LINE`] and got cut.
    pub overflow: bool,
}

/// Assembles lines from bytes as they trickle in.
#[derive(Debug, Default)]
pub(super) struct LineBuf {
    buf: Vec<u8>,
    overflow: bool,
}

impl LineBuf {
    /// Feed one byte; returns a line when `b` terminates a non-empty one.
    /// Bare terminators (the `\n` of a `\r\n`) are dropped.
    pub fn push(&mut self, b: u8) -> Option<Line> {
        match b {
            b'\r' | b'\n' => {
                if self.buf.is_empty() && !self.overflow {
                    return None;
                }
                Some(Line {
                    raw: std::mem::take(&mut self.buf),
                    term: b,
                    overflow: std::mem::take(&mut self.overflow),
                })
            }
            // Backspace and DEL edit the line, as on a terminal.
            0x08 | 0x7f => {
                self.buf.pop();
                None
            }
            _ => {
                if self.buf.len() < MAX_LINE {
                    self.buf.push(b);
                } else {
                    self.overflow = true;
                }
                None
            }
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.overflow = false;
    }
}

/// Where the command proper starts: modems skip anything before the `AT`
/// prefix (line noise, a stray NUL). `None` when the line has no prefix,
/// which a modem ignores without answering.
pub(super) fn at_start(raw: &[u8]) -> Option<usize> {
    raw.windows(2)
        .position(|w| w[0].eq_ignore_ascii_case(&b'A') && w[1].eq_ignore_ascii_case(&b'T'))
}

/// The form of an extended command.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// `AT+CSQ`
    Exec,
    /// `AT+CFUN?`
    Read,
    /// `AT+CFUN=?`
    Test,
    /// `AT+CFUN=1,1`: the raw argument text.
    Set(String),
}

/// One command of a command line.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Cmd {
    /// A basic command: `E0`, `I`, `Z`, `&F`, `V1`. `arg` is the number after
    /// the name, if any.
    Basic { name: String, arg: Option<u32> },
    /// An S-register: `S0=0` (set) or `S3?` (read).
    SReg { n: u32, set: Option<u32> },
    /// An extended command, `name` with its prefix (`+CGACT`, `^SYSINFOEX`).
    Ext { name: String, kind: Kind },
}

/// Split the text after `AT` (already upper-cased) into commands. `None`
/// when the line is malformed, which the modem answers with `ERROR`.
///
/// Basic commands run together (`E0V1`); extended ones are separated by `;`
/// (`+CSQ;+COPS?`), as V.250 describes.
pub(super) fn parse(body: &str) -> Option<Vec<Cmd>> {
    let b = body.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b';' | b' ' => i += 1,
            b'+' | b'^' | b'$' => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                if i == start + 1 {
                    return None;
                }
                let name = body[start..i].to_string();
                let kind = match b.get(i) {
                    Some(b'?') => {
                        i += 1;
                        Kind::Read
                    }
                    Some(b'=') if b.get(i + 1) == Some(&b'?') => {
                        i += 2;
                        Kind::Test
                    }
                    Some(b'=') => {
                        let args_start = i + 1;
                        i = args_start;
                        let mut quoted = false;
                        while i < b.len() && (quoted || b[i] != b';') {
                            if b[i] == b'"' {
                                quoted = !quoted;
                            }
                            i += 1;
                        }
                        if quoted {
                            return None;
                        }
                        Kind::Set(body[args_start..i].to_string())
                    }
                    _ => Kind::Exec,
                };
                if i < b.len() && b[i] != b';' {
                    return None;
                }
                out.push(Cmd::Ext { name, kind });
            }
            b'S' => {
                i += 1;
                let n = digits(b, &mut i)?;
                match b.get(i) {
                    Some(b'?') => {
                        i += 1;
                        out.push(Cmd::SReg { n, set: None });
                    }
                    Some(b'=') => {
                        i += 1;
                        let v = digits(b, &mut i)?;
                        out.push(Cmd::SReg { n, set: Some(v) });
                    }
                    _ => return None,
                }
            }
            c if c.is_ascii_alphabetic() || c == b'&' => {
                let start = i;
                i += 1;
                if c == b'&' {
                    if !b.get(i).is_some_and(u8::is_ascii_alphabetic) {
                        return None;
                    }
                    i += 1;
                }
                let name = body[start..i].to_string();
                let arg = if b.get(i).is_some_and(u8::is_ascii_digit) {
                    Some(digits(b, &mut i)?)
                } else {
                    None
                };
                out.push(Cmd::Basic { name, arg });
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A decimal number at `*i`, advancing past it; `None` if there is none or
/// it does not fit.
fn digits(b: &[u8], i: &mut usize) -> Option<u32> {
    let start = *i;
    let mut v: u32 = 0;
    while *i < b.len() && b[*i].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add(u32::from(b[*i] - b'0'))?;
        *i += 1;
    }
    (*i > start).then_some(v)
}

/// Split set-command arguments at commas outside quotes, trimmed, quotes
/// removed: `1,"IP","internet"` gives `["1", "IP", "internet"]`.
pub(super) fn args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out
}

/// Argument `i` as a number; `Ok(None)` when absent or empty, `Err` when
/// present but not a number.
pub(super) fn num(args: &[String], i: usize) -> Result<Option<u32>, ()> {
    match args.get(i).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Line> {
        let mut lb = LineBuf::default();
        input.iter().filter_map(|&b| lb.push(b)).collect()
    }

    #[test]
    fn lines_split_on_cr_and_skip_bare_lf() {
        let got = lines(b"AT\r\nATI\rAT+X\n\n");
        let raws: Vec<&[u8]> = got.iter().map(|l| l.raw.as_slice()).collect();
        assert_eq!(raws, vec![&b"AT"[..], b"ATI", b"AT+X"]);
        assert_eq!(got[2].term, b'\n');
    }

    #[test]
    fn backspace_edits_and_overlong_lines_are_cut() {
        assert_eq!(lines(b"ATX\x08I\r")[0].raw, b"ATI");
        let long = vec![b'A'; MAX_LINE + 100];
        let mut input = long.clone();
        input.push(b'\r');
        let got = lines(&input);
        assert_eq!(got.len(), 1);
        assert!(got[0].overflow);
        assert_eq!(got[0].raw.len(), MAX_LINE);
    }

    #[test]
    fn prefix_is_found_after_noise() {
        assert_eq!(at_start(b"\x00\xffat+csq"), Some(2));
        assert_eq!(at_start(b"hello"), None);
        assert_eq!(at_start(b""), None);
    }

    #[test]
    fn parses_basic_and_extended_commands() {
        assert_eq!(parse(""), Some(vec![]));
        assert_eq!(
            parse("E0V1"),
            Some(vec![
                Cmd::Basic {
                    name: "E".into(),
                    arg: Some(0)
                },
                Cmd::Basic {
                    name: "V".into(),
                    arg: Some(1)
                },
            ])
        );
        assert_eq!(
            parse("&F"),
            Some(vec![Cmd::Basic {
                name: "&F".into(),
                arg: None
            }])
        );
        assert_eq!(
            parse("+CSQ;+CFUN?;+CFUN=?;+CGACT=1,1"),
            Some(vec![
                Cmd::Ext {
                    name: "+CSQ".into(),
                    kind: Kind::Exec
                },
                Cmd::Ext {
                    name: "+CFUN".into(),
                    kind: Kind::Read
                },
                Cmd::Ext {
                    name: "+CFUN".into(),
                    kind: Kind::Test
                },
                Cmd::Ext {
                    name: "+CGACT".into(),
                    kind: Kind::Set("1,1".into())
                },
            ])
        );
        assert_eq!(
            parse("+QENG=\"SERVING;CELL\""),
            Some(vec![Cmd::Ext {
                name: "+QENG".into(),
                kind: Kind::Set("\"SERVING;CELL\"".into())
            }])
        );
        assert_eq!(parse("S0=0"), Some(vec![Cmd::SReg { n: 0, set: Some(0) }]));
        assert_eq!(
            parse("^SYSINFOEX"),
            Some(vec![Cmd::Ext {
                name: "^SYSINFOEX".into(),
                kind: Kind::Exec
            }])
        );
    }

    #[test]
    fn malformed_lines_are_rejected_not_panicking() {
        for bad in [
            "+",
            "+CSQ?X",
            "+Q=\"open",
            "&",
            "&1",
            "S",
            "S1",
            "E99999999999",
            "\u{fffd}",
            "#",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn arguments_split_outside_quotes() {
        assert_eq!(args("1,\"IP\",\"a,b\""), vec!["1", "IP", "a,b"]);
        assert_eq!(num(&args("0,1"), 1), Ok(Some(1)));
        assert_eq!(num(&args("0"), 1), Ok(None));
        assert_eq!(num(&args("x"), 0), Err(()));
    }
}
