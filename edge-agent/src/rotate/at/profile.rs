//! Per-model modem profiles: the rotation ladder and the telemetry commands
//! of one modem family, as data (TOML). The shipped profiles live in
//! `firmware-scripts/modems/` and are compiled into the agent, so it works
//! without the files installed; an operator can point `profile` at a file of
//! their own instead. The format is described in
//! `firmware-scripts/modems/README.md`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::client::check_command;
use super::telemetry::{Parser, SinrScale};

/// Shipped profiles: (name, TOML text).
const SHIPPED: &[(&str, &str)] = &[
    (
        "generic-3gpp",
        include_str!("../../../../firmware-scripts/modems/generic-3gpp.toml"),
    ),
    (
        "quectel-ec25",
        include_str!("../../../../firmware-scripts/modems/quectel-ec25.toml"),
    ),
    (
        "simcom-sim7600",
        include_str!("../../../../firmware-scripts/modems/simcom-sim7600.toml"),
    ),
    (
        "huawei-stick",
        include_str!("../../../../firmware-scripts/modems/huawei-stick.toml"),
    ),
];

/// Placeholder in commands for the configured PDP context id.
pub const CID_PLACEHOLDER: &str = "{cid}";

const MAX_TIMEOUT_MS: u64 = 300_000;
const MAX_PAUSE_MS: u64 = 120_000;
const MAX_STEPS: usize = 32;
const MAX_TELEMETRY: usize = 16;

#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Substrings of the `ATI` / `AT+CGMM` answer (case-insensitive) that
    /// identify a modem this profile is written for. Empty: any modem.
    pub models: Vec<String>,
    /// Sent after every opening of the port; answers are not checked.
    pub init: Vec<String>,
    /// Softest first.
    pub rungs: Vec<Rung>,
    pub telemetry: Vec<TelemetryCommand>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rung {
    pub name: String,
    pub description: String,
    /// The rung resets the module: its USB device (serial ports and network
    /// interface) disappears and comes back.
    pub reenumerates: bool,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Send {
        /// May contain [`CID_PLACEHOLDER`]; see [`render`].
        command: String,
        /// Overrides the configured per-command timeout.
        timeout: Option<Duration>,
        /// The module may vanish before answering (a reset): a missing
        /// answer or a closed port is not a failure.
        disconnects: bool,
    },
    Pause(Duration),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryCommand {
    pub command: String,
    pub parser: Parser,
    pub timeout: Option<Duration>,
    pub sinr_scale: SinrScale,
}

/// Fill the placeholders of a profile command.
pub fn render(command: &str, cid: u8) -> String {
    command.replace(CID_PLACEHOLDER, &cid.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    init: Vec<String>,
    #[serde(default, rename = "rung")]
    rungs: Vec<RungFile>,
    #[serde(default)]
    telemetry: Vec<TelemetryFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RungFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    reenumerates: bool,
    #[serde(default, rename = "step")]
    steps: Vec<StepFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    send: Option<String>,
    pause_ms: Option<u64>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    disconnects: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryFile {
    send: String,
    parse: Parser,
    timeout_ms: Option<u64>,
    #[serde(default)]
    sinr_scale: SinrScale,
}

fn checked_command(command: &str, what: &str) -> Result<String, String> {
    let command = command.trim();
    check_command(&render(command, 1)).map_err(|why| format!("{what}: {command:?} {why}"))?;
    if render(command, 1).contains(['{', '}']) {
        return Err(format!(
            "{what}: {command:?} has an unknown placeholder (only {CID_PLACEHOLDER} exists)"
        ));
    }
    Ok(command.to_string())
}

fn checked_timeout(ms: Option<u64>, what: &str) -> Result<Option<Duration>, String> {
    match ms {
        None => Ok(None),
        Some(ms) if (100..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Some(Duration::from_millis(ms))),
        Some(ms) => Err(format!(
            "{what}: timeout_ms = {ms} is outside 100..={MAX_TIMEOUT_MS}"
        )),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl Profile {
    /// Parse and check a profile.
    pub fn from_toml(text: &str) -> Result<Profile, String> {
        let file: ProfileFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let name = file.name.trim().to_string();
        if !valid_name(&name) {
            return Err(format!(
                "profile name {name:?} must be 1-32 characters of a-z, 0-9, '-' and '_'"
            ));
        }
        let init = file
            .init
            .iter()
            .map(|c| checked_command(c, "init"))
            .collect::<Result<Vec<_>, _>>()?;
        if file.rungs.is_empty() {
            return Err("the profile has no [[rung]]".into());
        }
        let mut seen = HashSet::new();
        let mut rungs = Vec::new();
        for r in file.rungs {
            let rname = r.name.trim().to_string();
            if !valid_name(&rname) {
                return Err(format!(
                    "rung name {rname:?} must be 1-32 characters of a-z, 0-9, '-' and '_'"
                ));
            }
            if !seen.insert(rname.clone()) {
                return Err(format!("rung {rname:?} appears twice"));
            }
            if r.steps.len() > MAX_STEPS {
                return Err(format!("rung {rname:?} has more than {MAX_STEPS} steps"));
            }
            let mut steps = Vec::new();
            for (i, s) in r.steps.into_iter().enumerate() {
                let what = format!("rung {rname:?} step {}", i + 1);
                steps.push(match (s.send, s.pause_ms) {
                    (Some(command), None) => Step::Send {
                        command: checked_command(&command, &what)?,
                        timeout: checked_timeout(s.timeout_ms, &what)?,
                        disconnects: s.disconnects,
                    },
                    (None, Some(ms)) => {
                        if s.timeout_ms.is_some() || s.disconnects {
                            return Err(format!(
                                "{what}: a pause takes no timeout_ms or disconnects"
                            ));
                        }
                        if ms > MAX_PAUSE_MS {
                            return Err(format!("{what}: pause_ms = {ms} is above {MAX_PAUSE_MS}"));
                        }
                        Step::Pause(Duration::from_millis(ms))
                    }
                    _ => {
                        return Err(format!(
                            "{what}: give exactly one of send = \"AT…\" or pause_ms"
                        ));
                    }
                });
            }
            if !steps.iter().any(|s| matches!(s, Step::Send { .. })) {
                return Err(format!("rung {rname:?} sends no command"));
            }
            rungs.push(Rung {
                name: rname,
                description: r.description.trim().to_string(),
                reenumerates: r.reenumerates,
                steps,
            });
        }
        if file.telemetry.len() > MAX_TELEMETRY {
            return Err(format!("more than {MAX_TELEMETRY} [[telemetry]] commands"));
        }
        let telemetry = file
            .telemetry
            .into_iter()
            .map(|t| {
                Ok(TelemetryCommand {
                    command: checked_command(&t.send, "telemetry")?,
                    parser: t.parse,
                    timeout: checked_timeout(t.timeout_ms, "telemetry")?,
                    sinr_scale: t.sinr_scale,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Profile {
            name,
            description: file.description.trim().to_string(),
            models: file
                .models
                .into_iter()
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .collect(),
            init,
            rungs,
            telemetry,
        })
    }

    /// A shipped profile by name, or a profile file by path (anything with
    /// a `/` or ending in `.toml`).
    pub fn load(selector: &str) -> Result<Profile, String> {
        if let Some(text) = shipped_text(selector) {
            return Profile::from_toml(text)
                .map_err(|e| format!("shipped profile {selector:?} is broken: {e}"));
        }
        if selector.contains('/') || selector.ends_with(".toml") {
            let path = Path::new(selector);
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read profile file {}: {e}", path.display()))?;
            return Profile::from_toml(&text)
                .map_err(|e| format!("profile file {}: {e}", path.display()));
        }
        Err(format!(
            "unknown profile {selector:?}: not a shipped profile ({}) nor a path to a .toml file",
            shipped_names().join(", ")
        ))
    }

    /// Whether the modem's identification text names a model this profile
    /// is written for (always true for a profile without `models`).
    pub fn matches(&self, ident: &str) -> bool {
        let ident = ident.to_ascii_uppercase();
        self.models.is_empty()
            || self
                .models
                .iter()
                .any(|m| ident.contains(&m.to_ascii_uppercase()))
    }

    pub fn rung_names(&self) -> Vec<String> {
        self.rungs.iter().map(|r| r.name.clone()).collect()
    }
}

fn shipped_text(name: &str) -> Option<&'static str> {
    SHIPPED.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

pub fn shipped_names() -> Vec<&'static str> {
    SHIPPED.iter().map(|(n, _)| *n).collect()
}

/// The shipped profile written for the modem that identifies itself with
/// `ident` (the `ATI` / `AT+CGMM` answer), if any.
pub fn identify(ident: &str) -> Option<&'static str> {
    SHIPPED.iter().map(|(n, _)| *n).find(|n| {
        Profile::load(n)
            .ok()
            .is_some_and(|p| !p.models.is_empty() && p.matches(ident))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_profile_parses() {
        for name in shipped_names() {
            let p = Profile::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(p.name, name, "the file's name matches its key");
            assert!(!p.rungs.is_empty(), "{name}: empty ladder");
            assert!(!p.description.is_empty(), "{name}: no description");
            assert!(!p.telemetry.is_empty(), "{name}: no telemetry");
            // Softest first: a module reset is never the first rung, and
            // only the last rung may re-enumerate the device.
            assert!(!p.rungs[0].reenumerates, "{name}");
            let last = p.rungs.len() - 1;
            assert!(
                p.rungs[..last].iter().all(|r| !r.reenumerates),
                "{name}: only the hardest rung may reset the module"
            );
            for r in &p.rungs {
                for s in &r.steps {
                    if let Step::Send { command, .. } = s {
                        assert!(check_command(&render(command, 3)).is_ok(), "{command}");
                    }
                }
            }
        }
    }

    #[test]
    fn shipped_ladders() {
        let names = |n: &str| Profile::load(n).unwrap().rung_names();
        assert_eq!(names("quectel-ec25"), ["pdp", "radio", "reset"]);
        assert_eq!(names("simcom-sim7600"), ["pdp", "radio", "reset"]);
        assert_eq!(names("huawei-stick"), ["pdp", "radio", "reset"]);
        assert_eq!(names("generic-3gpp"), ["pdp", "radio", "reset"]);
        let q = Profile::load("quectel-ec25").unwrap();
        assert_eq!(
            q.rungs[0].steps[0],
            Step::Send {
                command: "AT+CGACT=0,{cid}".into(),
                timeout: Some(Duration::from_secs(40)),
                disconnects: false
            }
        );
        assert!(q.rungs[2].reenumerates);
        let s = Profile::load("simcom-sim7600").unwrap();
        assert!(
            matches!(&s.rungs[2].steps[0], Step::Send { command, disconnects: true, .. } if command == "AT+CRESET")
        );
    }

    #[test]
    fn identification() {
        assert_eq!(
            identify("Quectel\nEC25\nRevision: EC25EFAR06A06M4G"),
            Some("quectel-ec25")
        );
        assert_eq!(identify("Quectel EG25"), Some("quectel-ec25"));
        assert_eq!(
            identify("Manufacturer: SIMCOM INCORPORATED\nModel: SIMCOM_SIM7600E-H"),
            Some("simcom-sim7600")
        );
        assert_eq!(
            identify("Manufacturer: huawei\nModel: E3372\nRevision: 21.180.01.00.00"),
            Some("huawei-stick")
        );
        assert_eq!(identify("Telit LE910"), None);
        assert!(Profile::load("generic-3gpp").unwrap().matches("anything"));
    }

    #[test]
    fn render_cid() {
        assert_eq!(render("AT+CGACT=1,{cid}", 3), "AT+CGACT=1,3");
    }

    const MINIMAL: &str = r#"
name = "mine"
[[rung]]
name = "pdp"
[[rung.step]]
send = "AT+CGACT=0,{cid}"
"#;

    #[test]
    fn custom_profile_errors() {
        assert!(Profile::from_toml(MINIMAL).is_ok());
        let bad = |text: &str, needle: &str| {
            let e = Profile::from_toml(text).unwrap_err();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        };
        bad("name = \"x\"", "no [[rung]]");
        bad(&MINIMAL.replace("mine", "Mine!"), "profile name");
        bad(&format!("{MINIMAL}\nextra = 1\n"), "unknown field");
        bad(&MINIMAL.replace("{cid}", "{apn}"), "unknown placeholder");
        bad(
            &MINIMAL.replace("AT+CGACT", "+CGACT"),
            "does not start with AT",
        );
        bad(&format!("{MINIMAL}pause_ms = 5\n"), "exactly one of send");
        bad(
            &format!("{MINIMAL}timeout_ms = 5\n"),
            "outside 100..=300000",
        );
        bad(
            &format!("{MINIMAL}[[rung]]\nname = \"pdp\"\n[[rung.step]]\nsend = \"AT\"\n"),
            "appears twice",
        );
        bad(
            &format!("{MINIMAL}[[rung]]\nname = \"radio\"\n[[rung.step]]\npause_ms = 100\n"),
            "sends no command",
        );
        bad(
            &format!("{MINIMAL}[[telemetry]]\nsend = \"AT+CSQ\"\nparse = \"nope\"\n"),
            "unknown variant",
        );
    }

    #[test]
    fn load_by_path_and_unknown_names() {
        let dir = std::env::temp_dir().join(format!("cellgate-at-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mine.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let p = Profile::load(path.to_str().unwrap()).unwrap();
        assert_eq!(p.name, "mine");
        std::fs::remove_dir_all(&dir).unwrap();

        let e = Profile::load("quectel-ec99").unwrap_err();
        assert!(
            e.contains("unknown profile") && e.contains("quectel-ec25"),
            "{e}"
        );
        let e = Profile::load("/nonexistent/x.toml").unwrap_err();
        assert!(
            e.contains("cannot read profile file /nonexistent/x.toml"),
            "{e}"
        );
    }
}
