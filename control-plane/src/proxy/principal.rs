//! Proxy usernames that carry routing parameters.
//!
//! A customer writes their login and, optionally, what they want of the exit
//! into the one username field every HTTP and SOCKS5 client has:
//!
//! ```text
//! alice-session-x7k2-ttl-10m-country-de-operator-vodafone-device-pi03
//! └─┬─┘ └─────────────────────── parameters ────────────────────────┘
//! login
//! ```
//!
//! Glossary:
//! - **login**: the customer's own username, the one the password is checked
//!   against. It may contain dashes (`acme-scraper`).
//! - **key**: one of the reserved words of [`Key::ALL`]. The first token that
//!   is a key (ASCII case-insensitively) ends the login.
//! - **parameters**: after the login, strictly `key-value` pairs, each key at
//!   most once. Together they are the [`RoutingParams`].
//! - **canonical form**: keys lowercase, in the order of [`Key::ALL`], values
//!   normalised; what `Display` prints and what [`parse_username`] reads back
//!   to the same value.
//!
//! Grammar, over tokens separated by `-` (a `-` is never part of a token):
//!
//! ```text
//! username = login [ "-" params ]             ; at most 255 bytes
//! login    = token *( "-" token )             ; no token is a key; not empty
//! params   = pair *( "-" pair )
//! pair     = key "-" value
//! key      = session | ttl | country | region | operator | label | kind
//!          | device | exit                    ; ASCII case-insensitive
//! value    = a non-empty token that is not a key, checked per key:
//!   session   [A-Za-z0-9_]{1,64}              ; kept as written
//!   ttl       [0-9]{1,6} ("s"|"m"|"h"|"d")    ; 1 s ..= 24 h; needs session
//!   country   ISO 3166-1 alpha-2 code         ; any case, stored lowercase
//!   region    [a-z0-9_.]{1,32}                ; any case, stored lowercase
//!   operator  [a-z0-9_.]{1,32}                ; any case, stored lowercase
//!   label     [a-z0-9_.]{1,32}                ; any case, stored lowercase
//!   kind      android | usb_modem | raspberry_pi | linux ; any case
//!   device    "dev_" HEX12 | "dev" "-" HEX12  ; a device id, see DeviceRef
//!           | [A-Za-z0-9_.]{1,64}             ; otherwise a device name
//!   exit      [a-z0-9_]{1,32}                 ; any case, stored lowercase
//! ```
//!
//! Why one parse: the login the password is verified against and the
//! parameters the router obeys must come from the same split of the same
//! string. Two parsers that disagree about where the login ends let a client
//! authenticate as one name and be routed or billed as another. So the proxy
//! calls [`parse_username`] once, checks the password against
//! [`Principal::login`], and routes by [`Principal::params`] of that very
//! value. For the same reason a new customer whose username contains a key
//! token is refused ([`login_conflicts_with_params`]): it could not be told
//! apart from a shorter login with parameters.
//!
//! The parser is deliberately literal: it never decodes percent-encoding and
//! gives `:` or any other byte no meaning; such bytes are simply part of a
//! login token (and then fail the password check) or make a value invalid.
//! Values cannot contain `-`, so labels, regions, exits or device names that
//! do cannot be asked for by name here.
//!
//! This module depends only on std, `thiserror` and `shared`'s wire types:
//! the fuzz crate includes it by path.

use std::fmt;
use std::time::Duration;

use shared::wire::DeviceKind;

/// Longest username accepted, in bytes: SOCKS5 carries the username behind a
/// one-byte length (RFC 1929), and HTTP customers get the same limit.
pub const MAX_USERNAME_LEN: usize = 255;

/// Shortest sticky-session lifetime a customer may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// Longest sticky-session lifetime a customer may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

const MAX_SESSION_LEN: usize = 64;
const MAX_NAME_LEN: usize = 32;
const MAX_DEVICE_NAME_LEN: usize = 64;
/// Hex digits after `dev-` in a device id.
const DEVICE_ID_HEX_LEN: usize = 12;
/// Longest run of digits in a ttl; enough for `86400s`, small enough that
/// no arithmetic on it can overflow.
const MAX_TTL_DIGITS: usize = 6;
/// How much of a customer's bad token an error message repeats.
const MAX_SHOWN_CHARS: usize = 40;

/// The reserved words that start a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Session,
    Ttl,
    Country,
    Region,
    Operator,
    Label,
    Kind,
    Device,
    Exit,
}

/// The known keys as an error message lists them: [`Key::ALL`] in order.
const KNOWN_KEYS: &str = "session, ttl, country, region, operator, label, kind, device, exit";

impl Key {
    /// Every key, in canonical order.
    pub const ALL: [Key; 9] = [
        Key::Session,
        Key::Ttl,
        Key::Country,
        Key::Region,
        Key::Operator,
        Key::Label,
        Key::Kind,
        Key::Device,
        Key::Exit,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Key::Session => "session",
            Key::Ttl => "ttl",
            Key::Country => "country",
            Key::Region => "region",
            Key::Operator => "operator",
            Key::Label => "label",
            Key::Kind => "kind",
            Key::Device => "device",
            Key::Exit => "exit",
        }
    }

    /// The key a token names, ASCII case-insensitively.
    pub fn from_token(token: &str) -> Option<Key> {
        Key::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(token))
    }

    /// What a value of this key looks like, for the customer.
    const fn rule(self) -> &'static str {
        match self {
            Key::Session => "a session id of 1-64 letters, digits or _ (e.g. session-x7k2)",
            Key::Ttl => {
                "a duration from 1s to 24h written as a number and a unit s, m, h or d \
                 (e.g. ttl-30s, ttl-10m, ttl-2h, ttl-1d)"
            }
            Key::Country => {
                "a two-letter ISO 3166-1 country code (e.g. country-de, country-us; \
                 the United Kingdom is gb)"
            }
            Key::Region => "1-32 letters, digits, _ or . (e.g. region-bavaria)",
            Key::Operator => "1-32 letters, digits, _ or . (e.g. operator-vodafone)",
            Key::Label => "1-32 letters, digits, _ or . (e.g. label-pool_a)",
            Key::Kind => "one of android, usb_modem, raspberry_pi, linux",
            Key::Device => {
                "a device name of 1-64 letters, digits, _ or ., or a device id \
                 written dev_0123456789ab"
            }
            Key::Exit => "an exit name of 1-32 letters, digits or _ (e.g. exit-wwan0)",
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which device a customer asked for.
///
/// Device ids are `dev-` and 12 hex digits, and a `-` cannot appear inside
/// a value, so a username writes an id as `dev_0123456789ab`; the literal
/// `dev-0123456789ab` is accepted too, because that is what customers copy
/// from the API. Any value of the form `dev_` + 12 hex digits is an id, never
/// a name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeviceRef {
    /// A device id as the control plane writes it: `dev-` and 12 lowercase
    /// hex digits.
    Id(String),
    /// A device name, as written (names compare case-insensitively).
    Name(String),
}

impl DeviceRef {
    /// The id or the name, as the registry knows it.
    pub fn as_str(&self) -> &str {
        match self {
            DeviceRef::Id(s) | DeviceRef::Name(s) => s,
        }
    }
}

impl fmt::Display for DeviceRef {
    /// The username form: an id with `_` in place of its `-`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRef::Id(id) => match id.strip_prefix("dev-") {
                Some(hex) => write!(f, "dev_{hex}"),
                None => f.write_str(id),
            },
            DeviceRef::Name(name) => f.write_str(name),
        }
    }
}

/// What a customer asked of the exit; `None` everywhere means "any exit".
///
/// Names are normalised (see the module's grammar) so the router compares
/// them without caring how the customer typed them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingParams {
    /// Sticky session: connections with the same session id keep the same
    /// exit (and address) while the session lives.
    pub session: Option<String>,
    /// How long the sticky session lives; only with `session`. Whole seconds.
    pub ttl: Option<Duration>,
    /// ISO 3166-1 alpha-2, lowercase.
    pub country: Option<String>,
    pub region: Option<String>,
    pub operator: Option<String>,
    pub label: Option<String>,
    pub kind: Option<DeviceKind>,
    pub device: Option<DeviceRef>,
    /// An exit name on the chosen device(s), e.g. one of two modems.
    pub exit: Option<String>,
}

impl RoutingParams {
    /// No parameter given: the customer's plan and default strategy decide.
    pub fn is_empty(&self) -> bool {
        *self == RoutingParams::default()
    }
}

/// The username form of a device kind.
pub const fn kind_str(kind: &DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Android => "android",
        DeviceKind::UsbModem => "usb_modem",
        DeviceKind::RaspberryPi => "raspberry_pi",
        DeviceKind::Linux => "linux",
    }
}

/// A ttl in the largest unit that writes it exactly.
struct TtlText(Duration);

impl fmt::Display for TtlText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        match [(86_400, 'd'), (3600, 'h'), (60, 'm')]
            .into_iter()
            .find(|(unit, _)| s != 0 && s.is_multiple_of(*unit))
        {
            Some((unit, c)) => write!(f, "{}{c}", s / unit),
            None => write!(f, "{s}s"),
        }
    }
}

fn write_pair(
    f: &mut fmt::Formatter<'_>,
    key: Key,
    value: Option<impl fmt::Display>,
) -> fmt::Result {
    match value {
        Some(v) => write!(f, "-{key}-{v}"),
        None => Ok(()),
    }
}

impl fmt::Display for RoutingParams {
    /// The canonical suffix: `-key-value` per parameter in [`Key::ALL`]
    /// order, or nothing. `format!("{login}{params}")` is a username.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_pair(f, Key::Session, self.session.as_ref())?;
        write_pair(f, Key::Ttl, self.ttl.map(TtlText))?;
        write_pair(f, Key::Country, self.country.as_ref())?;
        write_pair(f, Key::Region, self.region.as_ref())?;
        write_pair(f, Key::Operator, self.operator.as_ref())?;
        write_pair(f, Key::Label, self.label.as_ref())?;
        write_pair(f, Key::Kind, self.kind.as_ref().map(kind_str))?;
        write_pair(f, Key::Device, self.device.as_ref())?;
        write_pair(f, Key::Exit, self.exit.as_ref())
    }
}

/// A parsed username: who to authenticate, and where they want to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The customer's username, the one the password is checked against.
    pub login: String,
    pub params: RoutingParams,
}

impl fmt::Display for Principal {
    /// The canonical username.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.login, self.params)
    }
}

/// Why a username was refused. Every message tells the customer what to
/// change. None repeats the login, which names an account; a bad key or
/// value is repeated escaped and cut short, so it cannot forge log lines.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("the username is {len} bytes long; at most {MAX_USERNAME_LEN} are allowed")]
    TooLong { len: usize },
    #[error(
        "the username has no login before its parameters; write LOGIN-KEY-VALUE, \
         e.g. alice-country-de"
    )]
    EmptyLogin,
    #[error("parameter `{key}` in the username has no value; write {key}-VALUE with {}", .key.rule())]
    MissingValue { key: Key },
    #[error("parameter `{key}` appears more than once in the username; give it once")]
    Duplicate { key: Key },
    #[error("unknown parameter `{}` in the username; known: {KNOWN_KEYS}", shown(.token))]
    UnknownKey { token: String },
    #[error("stray `-` in the username parameters: two dashes in a row, or one at the end")]
    StrayDash,
    #[error("invalid {key} `{}` in the username: expected {}", shown(.value), .key.rule())]
    InvalidValue { key: Key, value: String },
    #[error("parameter `ttl` needs a sticky session; add one, e.g. alice-session-x7k2-ttl-10m")]
    TtlWithoutSession,
}

/// A customer's token, safe to print: escaped and cut short.
fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_SHOWN_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(MAX_SHOWN_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Split a proxy username into the login and its routing parameters.
///
/// Pure and total: any input gives a value or an error, never a panic.
pub fn parse_username(raw: &str) -> Result<Principal, ParamError> {
    if raw.len() > MAX_USERNAME_LEN {
        return Err(ParamError::TooLong { len: raw.len() });
    }
    let (login, rest) = split_login(raw);
    if login.is_empty() {
        return Err(ParamError::EmptyLogin);
    }
    let params = match rest {
        Some(rest) => parse_params(rest)?,
        None => RoutingParams::default(),
    };
    Ok(Principal {
        login: login.to_owned(),
        params,
    })
}

/// Whether a would-be customer username contains a key token, so that
/// [`parse_username`] would read part of it as parameters. Customer creation
/// refuses such names.
pub fn login_conflicts_with_params(login: &str) -> bool {
    login.split('-').any(|t| Key::from_token(t).is_some())
}

/// The login, and the parameters from the first key token on (if any).
fn split_login(raw: &str) -> (&str, Option<&str>) {
    let mut at = 0usize;
    for token in raw.split('-') {
        if Key::from_token(token).is_some() {
            // `at` is 0 or just after a '-', both char boundaries.
            return (&raw[..at.saturating_sub(1)], Some(&raw[at..]));
        }
        at += token.len() + 1;
    }
    (raw, None)
}

fn parse_params(rest: &str) -> Result<RoutingParams, ParamError> {
    let mut p = RoutingParams::default();
    let mut tokens = rest.split('-').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() {
            return Err(ParamError::StrayDash);
        }
        let key = Key::from_token(token).ok_or_else(|| ParamError::UnknownKey {
            token: token.to_owned(),
        })?;
        let value = tokens
            .next()
            .filter(|v| !v.is_empty() && Key::from_token(v).is_none())
            .ok_or(ParamError::MissingValue { key })?;
        if is_set(&p, key) {
            return Err(ParamError::Duplicate { key });
        }
        let invalid = || ParamError::InvalidValue {
            key,
            value: value.to_owned(),
        };
        match key {
            Key::Session => p.session = Some(session(value).ok_or_else(invalid)?),
            Key::Ttl => p.ttl = Some(ttl(value).ok_or_else(invalid)?),
            Key::Country => p.country = Some(country(value).ok_or_else(invalid)?),
            Key::Region => p.region = Some(name(value, true).ok_or_else(invalid)?),
            Key::Operator => p.operator = Some(name(value, true).ok_or_else(invalid)?),
            Key::Label => p.label = Some(name(value, true).ok_or_else(invalid)?),
            Key::Kind => p.kind = Some(kind(value).ok_or_else(invalid)?),
            Key::Exit => p.exit = Some(name(value, false).ok_or_else(invalid)?),
            Key::Device => {
                // `dev-0123456789ab` as the API prints it spans two tokens. A
                // 12-hex token is never a key, so taking it here cannot
                // swallow a parameter.
                if value == "dev"
                    && let Some(hex) = tokens.next_if(|t| is_hex12(t))
                {
                    p.device = Some(DeviceRef::Id(format!("dev-{}", hex.to_ascii_lowercase())));
                } else {
                    p.device = Some(device(value).ok_or_else(invalid)?);
                }
            }
        }
    }
    if p.ttl.is_some() && p.session.is_none() {
        return Err(ParamError::TtlWithoutSession);
    }
    Ok(p)
}

fn is_set(p: &RoutingParams, key: Key) -> bool {
    match key {
        Key::Session => p.session.is_some(),
        Key::Ttl => p.ttl.is_some(),
        Key::Country => p.country.is_some(),
        Key::Region => p.region.is_some(),
        Key::Operator => p.operator.is_some(),
        Key::Label => p.label.is_some(),
        Key::Kind => p.kind.is_some(),
        Key::Device => p.device.is_some(),
        Key::Exit => p.exit.is_some(),
    }
}

fn session(v: &str) -> Option<String> {
    (v.len() <= MAX_SESSION_LEN && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then(|| v.to_owned())
}

/// `[0-9]{1,6}` and a unit; within [`MIN_TTL`] ..= [`MAX_TTL`].
fn ttl(v: &str) -> Option<Duration> {
    let unit: u64 = match v.as_bytes().last()? {
        b's' => 1,
        b'm' => 60,
        b'h' => 3600,
        b'd' => 86_400,
        _ => return None,
    };
    // The unit is one ASCII byte, so this is a char boundary.
    let digits = &v[..v.len() - 1];
    if digits.is_empty()
        || digits.len() > MAX_TTL_DIGITS
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let ttl = Duration::from_secs(digits.parse::<u64>().ok()?.checked_mul(unit)?);
    (MIN_TTL..=MAX_TTL).contains(&ttl).then_some(ttl)
}

fn country(v: &str) -> Option<String> {
    let code = v.to_ascii_lowercase();
    COUNTRIES
        .binary_search(&code.as_str())
        .is_ok()
        .then_some(code)
}

/// A lowercase name: `[a-z0-9_]` plus `.` when `dot` is set, 1-32 bytes,
/// typed in any case.
fn name(v: &str, dot: bool) -> Option<String> {
    (v.len() <= MAX_NAME_LEN
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || (dot && b == b'.')))
    .then(|| v.to_ascii_lowercase())
}

fn kind(v: &str) -> Option<DeviceKind> {
    [
        DeviceKind::Android,
        DeviceKind::UsbModem,
        DeviceKind::RaspberryPi,
        DeviceKind::Linux,
    ]
    .into_iter()
    .find(|k| kind_str(k).eq_ignore_ascii_case(v))
}

fn is_hex12(t: &str) -> bool {
    t.len() == DEVICE_ID_HEX_LEN && t.bytes().all(|b| b.is_ascii_hexdigit())
}

fn device(v: &str) -> Option<DeviceRef> {
    if let Some(hex) = v.strip_prefix("dev_")
        && is_hex12(hex)
    {
        return Some(DeviceRef::Id(format!("dev-{}", hex.to_ascii_lowercase())));
    }
    (v.len() <= MAX_DEVICE_NAME_LEN
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.'))
    .then(|| DeviceRef::Name(v.to_owned()))
}

/// The officially assigned ISO 3166-1 alpha-2 codes, lowercase and sorted
/// (for `binary_search`). Reserved and user-assigned codes (`uk`, `eu`,
/// `xk`) are not here: no device reports them.
const COUNTRIES: [&str; 249] = [
    "ad", "ae", "af", "ag", "ai", "al", "am", "ao", "aq", "ar", "as", "at", "au", "aw", "ax", "az",
    "ba", "bb", "bd", "be", "bf", "bg", "bh", "bi", "bj", "bl", "bm", "bn", "bo", "bq", "br", "bs",
    "bt", "bv", "bw", "by", "bz", "ca", "cc", "cd", "cf", "cg", "ch", "ci", "ck", "cl", "cm", "cn",
    "co", "cr", "cu", "cv", "cw", "cx", "cy", "cz", "de", "dj", "dk", "dm", "do", "dz", "ec", "ee",
    "eg", "eh", "er", "es", "et", "fi", "fj", "fk", "fm", "fo", "fr", "ga", "gb", "gd", "ge", "gf",
    "gg", "gh", "gi", "gl", "gm", "gn", "gp", "gq", "gr", "gs", "gt", "gu", "gw", "gy", "hk", "hm",
    "hn", "hr", "ht", "hu", "id", "ie", "il", "im", "in", "io", "iq", "ir", "is", "it", "je", "jm",
    "jo", "jp", "ke", "kg", "kh", "ki", "km", "kn", "kp", "kr", "kw", "ky", "kz", "la", "lb", "lc",
    "li", "lk", "lr", "ls", "lt", "lu", "lv", "ly", "ma", "mc", "md", "me", "mf", "mg", "mh", "mk",
    "ml", "mm", "mn", "mo", "mp", "mq", "mr", "ms", "mt", "mu", "mv", "mw", "mx", "my", "mz", "na",
    "nc", "ne", "nf", "ng", "ni", "nl", "no", "np", "nr", "nu", "nz", "om", "pa", "pe", "pf", "pg",
    "ph", "pk", "pl", "pm", "pn", "pr", "ps", "pt", "pw", "py", "qa", "re", "ro", "rs", "ru", "rw",
    "sa", "sb", "sc", "sd", "se", "sg", "sh", "si", "sj", "sk", "sl", "sm", "sn", "so", "sr", "ss",
    "st", "sv", "sx", "sy", "sz", "tc", "td", "tf", "tg", "th", "tj", "tk", "tl", "tm", "tn", "to",
    "tr", "tt", "tv", "tw", "tz", "ua", "ug", "um", "us", "uy", "uz", "va", "vc", "ve", "vg", "vi",
    "vn", "vu", "wf", "ws", "ye", "yt", "za", "zm", "zw",
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(raw: &str) -> Principal {
        parse_username(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"))
    }

    fn err(raw: &str) -> ParamError {
        match parse_username(raw) {
            Ok(p) => panic!("{raw:?} parsed as {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn the_documented_example() {
        let p = ok("alice-session-x7k2-ttl-10m-country-de-operator-vodafone-device-pi03");
        assert_eq!(p.login, "alice");
        assert_eq!(
            p.params,
            RoutingParams {
                session: Some("x7k2".into()),
                ttl: Some(Duration::from_secs(600)),
                country: Some("de".into()),
                operator: Some("vodafone".into()),
                device: Some(DeviceRef::Name("pi03".into())),
                ..RoutingParams::default()
            }
        );
    }

    /// (username, login, canonical parameters).
    const ACCEPTED: &[(&str, &str, &str)] = &[
        ("alice", "alice", ""),
        ("acme-scraper-session-abc", "acme-scraper", "-session-abc"),
        ("a-b-c-country-fr", "a-b-c", "-country-fr"),
        // Keys in any case; names normalised; session ids kept as typed.
        (
            "Alice-COUNTRY-DE-Kind-USB_MODEM-Label-Pool_A-SESSION-AbC_9",
            "Alice",
            "-session-AbC_9-country-de-label-pool_a-kind-usb_modem",
        ),
        (
            "bob-region-Bavaria-operator-T_Mobile",
            "bob",
            "-region-bavaria-operator-t_mobile",
        ),
        (
            "bob-exit-WWAN0-kind-raspberry_pi",
            "bob",
            "-kind-raspberry_pi-exit-wwan0",
        ),
        ("bob-label-eu.pool", "bob", "-label-eu.pool"),
        // Order does not matter; ttl may come before its session.
        ("bob-ttl-30s-session-s1", "bob", "-session-s1-ttl-30s"),
        // ttl rendered in the largest exact unit.
        ("bob-session-s-ttl-1s", "bob", "-session-s-ttl-1s"),
        ("bob-session-s-ttl-90s", "bob", "-session-s-ttl-90s"),
        ("bob-session-s-ttl-120m", "bob", "-session-s-ttl-2h"),
        ("bob-session-s-ttl-24h", "bob", "-session-s-ttl-1d"),
        ("bob-session-s-ttl-86400s", "bob", "-session-s-ttl-1d"),
        ("bob-session-s-ttl-1440m", "bob", "-session-s-ttl-1d"),
        ("bob-session-s-ttl-007m", "bob", "-session-s-ttl-7m"),
        // Device ids: the `dev_` form, and the id as the API prints it.
        (
            "bob-device-dev_0123456789ab",
            "bob",
            "-device-dev_0123456789ab",
        ),
        (
            "bob-device-dev_0123456789AB",
            "bob",
            "-device-dev_0123456789ab",
        ),
        (
            "bob-device-dev-0123456789ab-country-de",
            "bob",
            "-country-de-device-dev_0123456789ab",
        ),
        // Not ids: names.
        ("bob-device-dev", "bob", "-device-dev"),
        ("bob-device-dev_0123", "bob", "-device-dev_0123"),
        ("bob-device-Pixel_7.a", "bob", "-device-Pixel_7.a"),
        // Hostile but harmless: bytes the parser gives no meaning stay in
        // the login, which then has to pass the password check.
        ("alice%2Dsession-x", "alice%2Dsession-x", ""),
        ("alice:x-session-y", "alice:x", "-session-y"),
        ("al\0ice-session-x", "al\0ice", "-session-x"),
        ("al ice", "al ice", ""),
        ("ålice-country-se", "ålice", "-country-se"),
        ("sessions-country-de", "sessions", "-country-de"),
        ("alice--session-x", "alice-", "-session-x"),
        ("alice-", "alice-", ""),
        ("-", "-", ""),
    ];

    #[test]
    fn accepted_usernames() {
        for &(raw, login, params) in ACCEPTED {
            let p = ok(raw);
            assert_eq!(p.login, login, "{raw:?}");
            assert_eq!(p.params.to_string(), params, "{raw:?}");
            assert_eq!(p.params.is_empty(), params.is_empty(), "{raw:?}");
            assert_eq!(parse_username(&p.to_string()), Ok(p), "{raw:?}");
        }
    }

    #[test]
    fn device_ids_and_names() {
        let id = DeviceRef::Id("dev-0123456789ab".into());
        for raw in [
            "bob-device-dev_0123456789ab",
            "bob-device-dev_0123456789AB",
            "bob-device-dev-0123456789ab",
            "bob-device-dev-0123456789AB",
        ] {
            assert_eq!(ok(raw).params.device.as_ref(), Some(&id), "{raw}");
        }
        assert_eq!(id.as_str(), "dev-0123456789ab");
        assert_eq!(
            ok("bob-device-pi03").params.device,
            Some(DeviceRef::Name("pi03".into()))
        );
    }

    #[test]
    fn kinds() {
        for (v, k) in [
            ("android", DeviceKind::Android),
            ("USB_MODEM", DeviceKind::UsbModem),
            ("raspberry_pi", DeviceKind::RaspberryPi),
            ("Linux", DeviceKind::Linux),
        ] {
            assert_eq!(ok(&format!("bob-kind-{v}")).params.kind, Some(k));
        }
    }

    fn invalid(key: Key, value: &str) -> ParamError {
        ParamError::InvalidValue {
            key,
            value: value.into(),
        }
    }

    #[test]
    fn refused_usernames() {
        let long_session = format!("bob-session-{}", "s".repeat(65));
        let long_device = format!("bob-device-{}", "d".repeat(65));
        let long_label = format!("bob-label-{}", "l".repeat(33));
        let cases: &[(&str, ParamError)] = &[
            ("", ParamError::EmptyLogin),
            ("-session-x", ParamError::EmptyLogin),
            ("session-x", ParamError::EmptyLogin),
            ("SESSION-x", ParamError::EmptyLogin),
            (
                "alice-session-",
                ParamError::MissingValue { key: Key::Session },
            ),
            (
                "alice-session",
                ParamError::MissingValue { key: Key::Session },
            ),
            (
                "alice-country-de-ttl",
                ParamError::MissingValue { key: Key::Ttl },
            ),
            // A key is never a value: the session id was forgotten.
            (
                "alice-session-ttl-10m",
                ParamError::MissingValue { key: Key::Session },
            ),
            (
                "alice-device-exit-wwan0",
                ParamError::MissingValue { key: Key::Device },
            ),
            (
                "alice-session-a-session-b",
                ParamError::Duplicate { key: Key::Session },
            ),
            (
                "alice-country-de-Country-at",
                ParamError::Duplicate { key: Key::Country },
            ),
            (
                "alice-device-dev_0123456789ab-device-pi",
                ParamError::Duplicate { key: Key::Device },
            ),
            (
                "alice-country-de-colour-red",
                ParamError::UnknownKey {
                    token: "colour".into(),
                },
            ),
            (
                "alice-country-de-at",
                ParamError::UnknownKey { token: "at".into() },
            ),
            (
                "alice-session-x-ñ",
                ParamError::UnknownKey { token: "ñ".into() },
            ),
            ("alice-session-x-", ParamError::StrayDash),
            ("alice-session-x--country-de", ParamError::StrayDash),
            ("alice-ttl-10m", ParamError::TtlWithoutSession),
            ("alice-session-x!y", invalid(Key::Session, "x!y")),
            ("alice-session-x.y", invalid(Key::Session, "x.y")),
            (&long_session, invalid(Key::Session, &"s".repeat(65))),
            ("alice-session-s-ttl-0s", invalid(Key::Ttl, "0s")),
            ("alice-session-s-ttl-25h", invalid(Key::Ttl, "25h")),
            ("alice-session-s-ttl-86401s", invalid(Key::Ttl, "86401s")),
            ("alice-session-s-ttl-2d", invalid(Key::Ttl, "2d")),
            ("alice-session-s-ttl-600", invalid(Key::Ttl, "600")),
            ("alice-session-s-ttl-m", invalid(Key::Ttl, "m")),
            ("alice-session-s-ttl-10M", invalid(Key::Ttl, "10M")),
            ("alice-session-s-ttl-1.5h", invalid(Key::Ttl, "1.5h")),
            ("alice-session-s-ttl-+5m", invalid(Key::Ttl, "+5m")),
            (
                "alice-session-s-ttl-9999999s",
                invalid(Key::Ttl, "9999999s"),
            ),
            ("alice-session-s-ttl-10é", invalid(Key::Ttl, "10é")),
            // Invalid ttl is reported even without a session: it comes first.
            ("alice-ttl-0s", invalid(Key::Ttl, "0s")),
            ("alice-country-xx", invalid(Key::Country, "xx")),
            ("alice-country-uk", invalid(Key::Country, "uk")),
            ("alice-country-deu", invalid(Key::Country, "deu")),
            ("alice-country-d", invalid(Key::Country, "d")),
            ("alice-country-dé", invalid(Key::Country, "dé")),
            ("alice-country-d\0", invalid(Key::Country, "d\0")),
            ("alice-region-new york", invalid(Key::Region, "new york")),
            ("alice-operator-o2%20de", invalid(Key::Operator, "o2%20de")),
            (&long_label, invalid(Key::Label, &"l".repeat(33))),
            ("alice-kind-usb", invalid(Key::Kind, "usb")),
            ("alice-kind-usbmodem", invalid(Key::Kind, "usbmodem")),
            ("alice-kind-ios", invalid(Key::Kind, "ios")),
            ("alice-device-pi:3", invalid(Key::Device, "pi:3")),
            (&long_device, invalid(Key::Device, &"d".repeat(65))),
            ("alice-exit-wwan.0", invalid(Key::Exit, "wwan.0")),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_username(raw).as_ref(), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn length_limit_is_socks5s() {
        let max = "a".repeat(MAX_USERNAME_LEN);
        assert_eq!(ok(&max).login, max);
        let over = "a".repeat(MAX_USERNAME_LEN + 1);
        assert_eq!(err(&over), ParamError::TooLong { len: 256 });
        // Bytes, not characters.
        let wide = "é".repeat(128);
        assert_eq!(err(&wide), ParamError::TooLong { len: 256 });
        let params = format!("bob-session-{}", "s".repeat(64));
        let padded = format!(
            "{}{params}",
            "b".repeat(MAX_USERNAME_LEN + 1 - params.len())
        );
        assert_eq!(err(&padded), ParamError::TooLong { len: 256 });
    }

    #[test]
    fn messages_say_what_to_change() {
        assert_eq!(
            err("alice-country-de-colour-red").to_string(),
            "unknown parameter `colour` in the username; known: session, ttl, country, \
             region, operator, label, kind, device, exit"
        );
        assert!(
            err("alice-ttl-10m")
                .to_string()
                .contains("session-x7k2-ttl-10m")
        );
        assert!(err("alice-country-uk").to_string().contains("gb"));
        assert!(err("alice-session").to_string().contains("session-VALUE"));
        assert!(err("alice-kind-usb").to_string().contains("usb_modem"));
        // A customer's bytes are escaped and cut short, never echoed raw.
        let m = err("alice-country-de-\u{1b}[2Jx").to_string();
        assert!(m.contains("\\u{1b}[2Jx"), "{m}");
        let m = err(&format!("alice-country-de-{}", "z".repeat(200))).to_string();
        assert!(
            m.contains(&format!("`{}…`", "z".repeat(MAX_SHOWN_CHARS))),
            "{m}"
        );
        // The login never appears.
        let m = err("hunter2-session-a-session-b").to_string();
        assert!(!m.contains("hunter2"), "{m}");
    }

    #[test]
    fn known_keys_listed_in_order() {
        let all: Vec<&str> = Key::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(KNOWN_KEYS, all.join(", "));
        let full = RoutingParams {
            session: Some("s".into()),
            ttl: Some(Duration::from_secs(5)),
            country: Some("de".into()),
            region: Some("r".into()),
            operator: Some("o".into()),
            label: Some("l".into()),
            kind: Some(DeviceKind::Linux),
            device: Some(DeviceRef::Name("d".into())),
            exit: Some("e".into()),
        }
        .to_string();
        let keys: Vec<&str> = full.split('-').skip(1).step_by(2).collect();
        assert_eq!(keys, all);
    }

    #[test]
    fn country_table_is_sorted_lowercase_pairs() {
        assert!(COUNTRIES.windows(2).all(|w| w[0] < w[1]));
        assert!(
            COUNTRIES
                .iter()
                .all(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_lowercase()))
        );
        for c in ["de", "us", "gb", "ru", "ua", "jp", "br", "ss", "sx"] {
            assert!(country(c).is_some(), "{c}");
        }
    }

    #[test]
    fn logins_that_would_read_as_parameters() {
        for login in [
            "acme-session",
            "acme-Session-bot",
            "device-farm",
            "my-exit",
            "ttl",
            "a-KIND-b",
        ] {
            assert!(login_conflicts_with_params(login), "{login}");
            assert_ne!(
                parse_username(login).map(|p| p.login),
                Ok(login.to_string())
            );
        }
        for login in [
            "alice",
            "acme-scraper",
            "sessions",
            "alice-",
            "dev-x",
            "exits-1",
        ] {
            assert!(!login_conflicts_with_params(login), "{login}");
            assert_eq!(ok(login).login, login);
        }
    }

    fn not_key(s: String) -> bool {
        Key::from_token(&s).is_none()
    }

    fn login() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.%:é]{1,12}(-[A-Za-z0-9_.]{0,8}){0,3}"
            .prop_filter("a key inside", |l| !login_conflicts_with_params(l))
    }

    fn name_value(dot: bool) -> impl Strategy<Value = String> {
        let re = if dot {
            "[a-z0-9_.]{1,32}"
        } else {
            "[a-z0-9_]{1,32}"
        };
        re.prop_filter("a key", |s| not_key(s.clone()))
    }

    fn device_ref() -> impl Strategy<Value = DeviceRef> {
        prop_oneof![
            "[0-9a-f]{12}".prop_map(|h| DeviceRef::Id(format!("dev-{h}"))),
            "[A-Za-z0-9_.]{1,64}"
                .prop_filter("a key, or an id", |s| {
                    not_key(s.clone()) && !s.strip_prefix("dev_").is_some_and(is_hex12)
                })
                .prop_map(DeviceRef::Name),
        ]
    }

    fn kind_value() -> impl Strategy<Value = DeviceKind> {
        prop_oneof![
            Just(DeviceKind::Android),
            Just(DeviceKind::UsbModem),
            Just(DeviceKind::RaspberryPi),
            Just(DeviceKind::Linux),
        ]
    }

    fn params() -> impl Strategy<Value = RoutingParams> {
        let session = proptest::option::of((
            "[A-Za-z0-9_]{1,64}".prop_filter("a key", |s| not_key(s.clone())),
            proptest::option::of(1u64..=86_400),
        ));
        (
            session,
            proptest::option::of(proptest::sample::select(&COUNTRIES[..])),
            proptest::option::of(name_value(true)),
            proptest::option::of(name_value(true)),
            proptest::option::of(name_value(true)),
            proptest::option::of(kind_value()),
            proptest::option::of(device_ref()),
            proptest::option::of(name_value(false)),
        )
            .prop_map(
                |(session, country, region, operator, label, kind, device, exit)| RoutingParams {
                    ttl: session
                        .as_ref()
                        .and_then(|(_, t)| t.map(Duration::from_secs)),
                    session: session.map(|(s, _)| s),
                    country: country.map(str::to_owned),
                    region,
                    operator,
                    label,
                    kind,
                    device,
                    exit,
                },
            )
    }

    /// Tokens a customer (or an attacker) might string together.
    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(&Key::ALL[..]).prop_flat_map(|k| {
                let k = k.as_str();
                prop_oneof![Just(k.to_owned()), Just(k.to_ascii_uppercase())]
            }),
            Just(String::new()),
            Just("dev".to_owned()),
            "[0-9a-fA-F]{12}",
            "dev_[0-9a-f]{12}",
            "[0-9]{1,7}[smhdx]",
            "[a-zA-Z0-9_.]{1,6}",
            "[^-]{0,4}",
        ]
    }

    proptest! {
        #[test]
        fn canonical_form_round_trips(login in login(), params in params()) {
            let raw = format!("{login}{params}");
            prop_assume!(raw.len() <= MAX_USERNAME_LEN);
            let want = Principal { login, params };
            prop_assert_eq!(want.to_string(), raw.clone());
            prop_assert_eq!(parse_username(&raw), Ok(want));
        }

        #[test]
        fn a_login_alone_is_itself(login in login()) {
            let p = parse_username(&login).unwrap();
            prop_assert_eq!(p.login, login);
            prop_assert!(p.params.is_empty());
        }

        #[test]
        fn any_tokens(tokens in proptest::collection::vec(token(), 0..12)) {
            check_any(&tokens.join("-"))?;
        }

        #[test]
        fn any_text(raw in "\\PC{0,300}") {
            check_any(&raw)?;
        }
    }

    /// What holds for any input: the login is a prefix that creation would
    /// accept, the canonical form is no longer and reads back to the same
    /// value, and errors print safely.
    fn check_any(raw: &str) -> Result<(), TestCaseError> {
        match parse_username(raw) {
            Ok(p) => {
                prop_assert!(raw.len() <= MAX_USERNAME_LEN);
                prop_assert!(!p.login.is_empty());
                prop_assert!(raw.starts_with(&p.login));
                prop_assert!(!login_conflicts_with_params(&p.login));
                prop_assert!(p.params.ttl.is_none() || p.params.session.is_some());
                // Normalising never lengthens: the canonical form fits too.
                let canonical = p.to_string();
                prop_assert!(canonical.len() <= raw.len());
                prop_assert_eq!(parse_username(&canonical), Ok(p));
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(!m.is_empty() && m.len() < 600, "{}", m);
                prop_assert!(!m.chars().any(char::is_control), "{:?}", m);
            }
        }
        Ok(())
    }
}
