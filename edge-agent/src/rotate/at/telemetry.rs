//! Parsers for the answers the agent reads telemetry and attach state from.
//! Pure: one information line (prefix included) in, values out; anything
//! malformed gives `None`, never a panic.
//!
//! Readings outside the physical range of the quantity (a modem that
//! reports `0` or a raw index where dBm belongs) are dropped rather than
//! passed on as nonsense.

use serde::Deserialize;
use shared::wire::{Registration, Telemetry};

use super::codec::strip_prefix_ci;

/// Split the parameters of an AT answer at commas outside double quotes;
/// quotes are removed and fields trimmed.
pub fn fields(params: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in params.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out
}

/// The parameters after `prefix` (e.g. `+CSQ:`), split into fields.
fn params(line: &str, prefix: &str) -> Option<Vec<String>> {
    strip_prefix_ci(line.trim(), prefix).map(fields)
}

fn int(field: Option<&String>) -> Option<i32> {
    field?.trim().parse().ok()
}

fn in_range<T: PartialOrd>(v: T, lo: T, hi: T) -> Option<T> {
    (lo..=hi).contains(&v).then_some(v)
}

/// `+CSQ: <rssi>,<ber>` → RSSI in dBm. Index 0..=31 maps to
/// `-113 + 2 * n` dBm; 99 (and anything else) means unknown.
pub fn parse_csq(line: &str) -> Option<i16> {
    let f = params(line, "+CSQ:")?;
    let n = in_range(int(f.first())?, 0, 31)?;
    Some((-113 + 2 * n) as i16)
}

/// `+COPS: <mode>[,<format>,"<oper>"[,<act>]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cops {
    pub mode: u8,
    /// The operator: long or short name, or numeric `MCCMNC`, as `format`
    /// says. `None` while not registered.
    pub operator: Option<String>,
    pub act: Option<u8>,
}

pub fn parse_cops(line: &str) -> Option<Cops> {
    let f = params(line, "+COPS:")?;
    let mode = u8::try_from(int(f.first())?).ok()?;
    let operator = f.get(2).filter(|o| !o.is_empty()).cloned();
    let act = int(f.get(3)).and_then(|a| u8::try_from(a).ok());
    Some(Cops {
        mode,
        operator,
        act,
    })
}

/// Access technology name for a 3GPP `<AcT>` value (TS 27.007 `+COPS`).
/// 8 (EC-GSM-IoT in the standard, LTE-M on some vendors' firmware) is
/// left unnamed.
pub fn act_name(act: u8) -> Option<&'static str> {
    Some(match act {
        0 | 1 | 3 => "GSM",
        2 | 4..=6 => "WCDMA",
        7 | 10 => "LTE",
        9 => "NB-IoT",
        11..=13 => "NR5G",
        _ => return None,
    })
}

/// Normalise a modem's technology text (`FDD LTE`, `HSPA+`, `NR5G-SA`) to
/// the names telemetry uses.
pub fn normalise_tech(raw: &str) -> Option<String> {
    let up = raw.trim().to_ascii_uppercase();
    if up.is_empty() || up.contains("NO SERVICE") || up == "NONE" {
        return None;
    }
    let name = if up.contains("NR5G") || up.starts_with("NR") || up.contains("5G") {
        "NR5G"
    } else if up.contains("EMTC") || up.contains("CAT-M") || up.contains("CATM") {
        "LTE-M"
    } else if up.contains("NBIOT") || up.contains("NB-IOT") {
        "NB-IoT"
    } else if up.contains("LTE") || up.contains("EUTRAN") {
        "LTE"
    } else if up.contains("WCDMA")
        || up.contains("UMTS")
        || up.contains("HSPA")
        || up.contains("HSDPA")
        || up.contains("HSUPA")
        || up.contains("TDSCDMA")
        || up.contains("TD-SCDMA")
    {
        "WCDMA"
    } else if up.contains("GSM") || up.contains("EDGE") || up.contains("GPRS") {
        "GSM"
    } else if up.contains("CDMA") || up.contains("EVDO") || up.contains("HDR") {
        "CDMA"
    } else {
        return Some(up.chars().take(16).collect());
    };
    Some(name.to_string())
}

/// `<stat>` of `+CREG`/`+CGREG`/`+CEREG`/`+C5GREG` (3GPP TS 27.007).
pub fn registration_from_stat(stat: u8) -> Registration {
    match stat {
        0 => Registration::NotRegistered,
        1 => Registration::Home,
        2 => Registration::Searching,
        3 => Registration::Denied,
        5 => Registration::Roaming,
        _ => Registration::Unknown,
    }
}

/// Registered for data in the sense the rotation waits for: home (1) or
/// roaming (5).
pub fn stat_is_registered(stat: u8) -> bool {
    stat == 1 || stat == 5
}

/// The answer to a registration query: `+CEREG: <n>,<stat>[,…]` (also
/// `+CREG:`, `+CGREG:`, `+C5GREG:`) → `<stat>`. The query form always
/// carries `<n>` first, unlike the URC form.
pub fn parse_registration_query(line: &str) -> Option<u8> {
    let line = line.trim();
    let prefix = ["+CEREG:", "+CREG:", "+CGREG:", "+C5GREG:"]
        .into_iter()
        .find(|p| strip_prefix_ci(line, p).is_some())?;
    let f = params(line, prefix)?;
    if f.len() < 2 {
        return None;
    }
    u8::try_from(int(f.get(1))?).ok()
}

/// `+CGPADDR: <cid>[,<addr>[,<addr>]]` → the context id and its non-empty
/// addresses (`0.0.0.0` and all-zero forms count as none).
pub fn parse_cgpaddr(line: &str) -> Option<(u8, Vec<String>)> {
    let f = params(line, "+CGPADDR:")?;
    let cid = u8::try_from(int(f.first())?).ok()?;
    let addrs = f[1..]
        .iter()
        .filter(|a| !a.is_empty() && a.chars().any(|c| c.is_ascii_hexdigit() && c != '0'))
        .cloned()
        .collect();
    Some((cid, addrs))
}

/// `+CGACT: <cid>,<state>` → (cid, active).
pub fn parse_cgact(line: &str) -> Option<(u8, bool)> {
    let f = params(line, "+CGACT:")?;
    let cid = u8::try_from(int(f.first())?).ok()?;
    let state = int(f.get(1))?;
    Some((cid, state == 1))
}

/// `+QNWINFO: "<act>","<oper>","<band>",<channel>` (Quectel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qnwinfo {
    pub tech: Option<String>,
    /// Numeric `MCCMNC`.
    pub operator: Option<String>,
    /// As the modem names it: `LTE BAND 3`.
    pub band: Option<String>,
    pub channel: Option<u32>,
}

pub fn parse_qnwinfo(line: &str) -> Option<Qnwinfo> {
    let f = params(line, "+QNWINFO:")?;
    if f.len() < 3 {
        // `+QNWINFO: No Service`
        return None;
    }
    let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
    Some(Qnwinfo {
        tech: normalise_tech(&f[0]),
        operator: nonempty(&f[1]),
        band: nonempty(&f[2]),
        channel: f.get(3).and_then(|c| c.parse().ok()),
    })
}

/// How a profile's modem reports SINR in `+QENG: "servingcell"`: Quectel's
/// manuals differ between module families.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinrScale {
    /// Plain dB (EG25/EC25 firmware seen in the field).
    #[default]
    Db,
    /// 0..=250 in fifths of a dB from -20 dB: `dB = n / 5 - 20`.
    FifthDb,
}

/// A serving cell as the modem describes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServingCell {
    pub tech: Option<String>,
    /// Upper-case hexadecimal.
    pub cell_id: Option<String>,
    /// `LTE BAND 3` / `NR5G BAND 78`.
    pub band: Option<String>,
    /// `MCCMNC`.
    pub operator: Option<String>,
    pub rssi_dbm: Option<i16>,
    pub rsrp_dbm: Option<i16>,
    pub rsrq_db: Option<f32>,
    pub sinr_db: Option<f32>,
}

fn rsrp(v: f32) -> Option<i16> {
    in_range(v, -156.0, -31.0).map(|v| v.round() as i16)
}
fn rsrq(v: f32) -> Option<f32> {
    in_range(v, -43.0, 20.0)
}
fn rssi(v: f32) -> Option<i16> {
    in_range(v, -130.0, 0.0).map(|v| v.round() as i16)
}
fn sinr(v: f32) -> Option<f32> {
    in_range(v, -23.0, 40.0)
}
fn num(f: &[String], i: usize) -> Option<f32> {
    f.get(i)?.parse::<f32>().ok().filter(|v| v.is_finite())
}
fn hex_id(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    (!s.is_empty() && s.len() <= 16 && s.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| s.trim_start_matches('0').to_ascii_uppercase())
        .map(|s| if s.is_empty() { "0".into() } else { s })
}
fn plmn(mcc: Option<&String>, mnc: Option<&String>) -> Option<String> {
    let (mcc, mnc) = (mcc?, mnc?);
    let ok = |s: &String| !s.is_empty() && s.len() <= 3 && s.chars().all(|c| c.is_ascii_digit());
    (ok(mcc) && ok(mnc)).then(|| format!("{mcc}{mnc}"))
}

/// Quectel `AT+QENG="servingcell"` answer lines.
///
/// LTE: `+QENG: "servingcell",<state>,"LTE",<is_tdd>,<MCC>,<MNC>,<cellID>,
/// <PCID>,<earfcn>,<freq_band_ind>,<UL_bandwidth>,<DL_bandwidth>,<TAC>,
/// <RSRP>,<RSRQ>,<RSSI>,<SINR>[,<CQI>,<tx_power>],<srxlev>`. In EN-DC mode
/// the LTE fields come on their own line without the first two
/// (`+QENG: "LTE",<is_tdd>,…`). NR5G-SA: `"servingcell",<state>,"NR5G-SA",
/// <duplex>,<MCC>,<MNC>,<cellID>,<PCID>,<TAC>,<ARFCN>,<band>,<bw>,<RSRP>,
/// <RSRQ>,<SINR>,…`. WCDMA and GSM: `"servingcell",<state>,<rat>,<MCC>,
/// <MNC>,<LAC>,<cellID>,…` (only the technology and cell are read). `-`
/// marks a missing value.
pub fn parse_qeng(lines: &[&str], scale: SinrScale) -> Option<ServingCell> {
    let mut cell: Option<ServingCell> = None;
    for line in lines {
        let Some(f) = params(line, "+QENG:") else {
            continue;
        };
        // Offset of the RAT field.
        let rat_at = if f
            .first()
            .is_some_and(|s| s.eq_ignore_ascii_case("servingcell"))
        {
            2
        } else {
            0
        };
        let Some(rat) = f.get(rat_at).map(|s| s.to_ascii_uppercase()) else {
            continue;
        };
        let b = rat_at; // fields below are relative to the RAT
        let parsed = match rat.as_str() {
            "LTE" | "CAT-M" | "EMTC" | "CAT-NB" | "NBIOT" => ServingCell {
                tech: normalise_tech(&rat),
                operator: plmn(f.get(b + 2), f.get(b + 3)),
                cell_id: f.get(b + 4).and_then(|s| hex_id(s)),
                band: f
                    .get(b + 7)
                    .and_then(|s| s.parse::<u16>().ok())
                    .map(|n| format!("LTE BAND {n}")),
                rsrp_dbm: num(&f, b + 11).and_then(rsrp),
                rsrq_db: num(&f, b + 12).and_then(rsrq),
                rssi_dbm: num(&f, b + 13).and_then(rssi),
                sinr_db: num(&f, b + 14)
                    .map(|v| match scale {
                        SinrScale::Db => v,
                        SinrScale::FifthDb => v / 5.0 - 20.0,
                    })
                    .and_then(sinr),
            },
            "NR5G-SA" => ServingCell {
                tech: Some("NR5G".into()),
                operator: plmn(f.get(b + 2), f.get(b + 3)),
                cell_id: f.get(b + 4).and_then(|s| hex_id(s)),
                band: f
                    .get(b + 8)
                    .and_then(|s| s.parse::<u16>().ok())
                    .map(|n| format!("NR5G BAND {n}")),
                rsrp_dbm: num(&f, b + 10).and_then(rsrp),
                rsrq_db: num(&f, b + 11).and_then(rsrq),
                sinr_db: num(&f, b + 12).and_then(sinr),
                rssi_dbm: None,
            },
            "NR5G-NSA" => {
                // The LTE anchor line carries the cell; only note NR.
                if let Some(c) = cell.as_mut() {
                    c.tech = Some("NR5G".into());
                }
                continue;
            }
            "WCDMA" | "GSM" | "TDSCDMA" | "CDMA" | "HDR" => ServingCell {
                tech: normalise_tech(&rat),
                operator: plmn(f.get(b + 1), f.get(b + 2)),
                cell_id: f.get(b + 4).and_then(|s| hex_id(s)),
                ..ServingCell::default()
            },
            // `"servingcell","SEARCH"` and the like: no cell.
            _ => continue,
        };
        cell = Some(match cell {
            // EN-DC: keep NR5G as the technology once seen.
            Some(prev) if prev.tech.as_deref() == Some("NR5G") => ServingCell {
                tech: prev.tech,
                ..parsed
            },
            _ => parsed,
        });
    }
    cell
}

/// SIMCom `AT+CPSI?` answer: `+CPSI: <mode>,<op mode>[,…]`.
///
/// LTE: `+CPSI: LTE,Online,<MCC>-<MNC>,<TAC>,<SCellID>,<PCellID>,
/// <band>,<earfcn>,<dlbw>,<ulbw>,<RSRQ>,<RSRP>,<RSSI>,<RSSNR>` with RSRQ,
/// RSRP and RSSI in tenths (`-92` = -9.2 dB) and RSSNR in dB. Other
/// systems: the cell id is the fifth field, in decimal.
pub fn parse_cpsi(line: &str) -> Option<ServingCell> {
    let f = params(line, "+CPSI:")?;
    let mode = f.first()?.to_ascii_uppercase();
    let tech = normalise_tech(&mode)?;
    let operator = f.get(2).and_then(|p| {
        let (mcc, mnc) = p.split_once('-')?;
        plmn(Some(&mcc.to_string()), Some(&mnc.to_string()))
    });
    let cell_id = f
        .get(4)
        .and_then(|s| s.parse::<u64>().ok())
        .map(|n| format!("{n:X}"));
    let mut cell = ServingCell {
        tech: Some(tech.clone()),
        operator,
        cell_id,
        ..ServingCell::default()
    };
    if tech == "LTE" && f.len() >= 14 {
        cell.band = f.get(6).and_then(|b| {
            let up = b.to_ascii_uppercase();
            let n: u16 = up.strip_prefix("EUTRAN-BAND")?.parse().ok()?;
            Some(format!("LTE BAND {n}"))
        });
        cell.rsrq_db = num(&f, 10).map(|v| v / 10.0).and_then(rsrq);
        cell.rsrp_dbm = num(&f, 11).map(|v| v / 10.0).and_then(rsrp);
        cell.rssi_dbm = num(&f, 12).map(|v| v / 10.0).and_then(rssi);
        cell.sinr_db = num(&f, 13).and_then(sinr);
    }
    Some(cell)
}

/// The answer parsers a profile can name for a telemetry command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parser {
    /// Run the command, read nothing (e.g. `AT+COPS=3,0` to select the
    /// long operator name format).
    None,
    Csq,
    Cops,
    /// `+CREG`/`+CGREG`/`+CEREG`/`+C5GREG` query answers.
    Registration,
    Qnwinfo,
    Qeng,
    Cpsi,
}

fn fill<T>(slot: &mut Option<T>, value: Option<T>) {
    if slot.is_none() {
        *slot = value;
    }
}

fn registration_rank(r: Registration) -> u8 {
    match r {
        Registration::Home | Registration::Roaming => 5,
        Registration::Searching => 4,
        Registration::Denied => 3,
        Registration::NotRegistered => 2,
        Registration::Unknown => 1,
    }
}

/// Merge one telemetry answer into `t`. Earlier commands win for each
/// field (profiles list the most trusted source first), except
/// registration, where the best state across technologies wins (a modem
/// can be registered on 2G/3G with `+CEREG` saying 0).
pub fn apply(t: &mut Telemetry, parser: Parser, lines: &[String], scale: SinrScale) {
    let first = |prefix: &str| {
        lines
            .iter()
            .find(|l| strip_prefix_ci(l.trim(), prefix).is_some())
    };
    match parser {
        Parser::None => {}
        Parser::Csq => fill(&mut t.rssi_dbm, first("+CSQ:").and_then(|l| parse_csq(l))),
        Parser::Cops => {
            if let Some(c) = first("+COPS:").and_then(|l| parse_cops(l)) {
                fill(&mut t.operator, c.operator);
                fill(
                    &mut t.access_tech,
                    c.act.and_then(act_name).map(str::to_string),
                );
            }
        }
        Parser::Registration => {
            for stat in lines.iter().filter_map(|l| parse_registration_query(l)) {
                let r = registration_from_stat(stat);
                if t.registration
                    .is_none_or(|old| registration_rank(r) > registration_rank(old))
                {
                    t.registration = Some(r);
                }
            }
        }
        Parser::Qnwinfo => {
            if let Some(q) = first("+QNWINFO:").and_then(|l| parse_qnwinfo(l)) {
                fill(&mut t.access_tech, q.tech);
                fill(&mut t.band, q.band);
                fill(&mut t.operator, q.operator);
            }
        }
        Parser::Qeng => {
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            if let Some(c) = parse_qeng(&refs, scale) {
                apply_cell(t, c);
            }
        }
        Parser::Cpsi => {
            if let Some(c) = first("+CPSI:").and_then(|l| parse_cpsi(l)) {
                apply_cell(t, c);
            }
        }
    }
}

fn apply_cell(t: &mut Telemetry, c: ServingCell) {
    fill(&mut t.access_tech, c.tech);
    fill(&mut t.cell_id, c.cell_id);
    fill(&mut t.band, c.band);
    fill(&mut t.operator, c.operator);
    fill(&mut t.rssi_dbm, c.rssi_dbm);
    fill(&mut t.rsrp_dbm, c.rsrp_dbm);
    fill(&mut t.rsrq_db, c.rsrq_db);
    fill(&mut t.sinr_db, c.sinr_db);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn csq() {
        assert_eq!(parse_csq("+CSQ: 23,99"), Some(-67));
        assert_eq!(parse_csq("+CSQ: 0,0"), Some(-113));
        assert_eq!(parse_csq("+CSQ: 31,99"), Some(-51));
        assert_eq!(parse_csq("+CSQ: 99,99"), None);
        assert_eq!(parse_csq("+CSQ:"), None);
        assert_eq!(parse_csq("+CSQ: x,y"), None);
    }

    #[test]
    fn cops() {
        assert_eq!(
            parse_cops("+COPS: 0,0,\"Vodafone.de\",7"),
            Some(Cops {
                mode: 0,
                operator: Some("Vodafone.de".into()),
                act: Some(7)
            })
        );
        assert_eq!(
            parse_cops("+COPS: 0,2,\"302490\",7").unwrap().operator,
            Some("302490".into())
        );
        assert_eq!(
            parse_cops("+COPS: 0"),
            Some(Cops {
                mode: 0,
                operator: None,
                act: None
            })
        );
        // A comma inside the quoted name.
        assert_eq!(
            parse_cops("+COPS: 1,0,\"A, B\",2").unwrap().operator,
            Some("A, B".into())
        );
        assert_eq!(act_name(7), Some("LTE"));
        assert_eq!(act_name(2), Some("WCDMA"));
        assert_eq!(act_name(13), Some("NR5G"));
    }

    #[test]
    fn registration() {
        assert_eq!(parse_registration_query("+CEREG: 0,1"), Some(1));
        assert_eq!(
            parse_registration_query("+CEREG: 2,5,\"1A2B\",\"01A2B3C4\",7"),
            Some(5)
        );
        assert_eq!(parse_registration_query("+CREG: 0,2"), Some(2));
        // The URC form has no <n>: not a query answer.
        assert_eq!(parse_registration_query("+CEREG: 1"), None);
        assert_eq!(registration_from_stat(1), Registration::Home);
        assert_eq!(registration_from_stat(5), Registration::Roaming);
        assert_eq!(registration_from_stat(3), Registration::Denied);
        assert_eq!(registration_from_stat(4), Registration::Unknown);
        assert!(stat_is_registered(5) && !stat_is_registered(2));
    }

    #[test]
    fn cgpaddr_and_cgact() {
        assert_eq!(
            parse_cgpaddr("+CGPADDR: 1,\"10.64.12.34\""),
            Some((1, vec!["10.64.12.34".into()]))
        );
        assert_eq!(
            parse_cgpaddr("+CGPADDR: 1,10.64.12.34"),
            Some((1, vec!["10.64.12.34".into()]))
        );
        assert_eq!(parse_cgpaddr("+CGPADDR: 1"), Some((1, vec![])));
        assert_eq!(parse_cgpaddr("+CGPADDR: 1,\"0.0.0.0\""), Some((1, vec![])));
        assert_eq!(parse_cgpaddr("+CGPADDR: 2,\"\""), Some((2, vec![])));
        assert_eq!(
            parse_cgpaddr("+CGPADDR: 1,\"100.64.0.2\",\"32.1.13.184.0.0.0.0.0.0.0.0.0.0.0.1\"")
                .unwrap()
                .1
                .len(),
            2
        );
        assert_eq!(parse_cgact("+CGACT: 1,1"), Some((1, true)));
        assert_eq!(parse_cgact("+CGACT: 8,0"), Some((8, false)));
    }

    #[test]
    fn qnwinfo() {
        assert_eq!(
            parse_qnwinfo("+QNWINFO: \"FDD LTE\",\"46011\",\"LTE BAND 3\",1825"),
            Some(Qnwinfo {
                tech: Some("LTE".into()),
                operator: Some("46011".into()),
                band: Some("LTE BAND 3".into()),
                channel: Some(1825),
            })
        );
        assert_eq!(parse_qnwinfo("+QNWINFO: No Service"), None);
    }

    #[test]
    fn qeng_lte() {
        let c = parse_qeng(
            &["+QENG: \"servingcell\",\"NOCONN\",\"LTE\",\"FDD\",214,01,7676A09,188,6300,20,3,3,603,-104,-9,-78,11,23"],
            SinrScale::Db,
        )
        .unwrap();
        assert_eq!(
            c,
            ServingCell {
                tech: Some("LTE".into()),
                cell_id: Some("7676A09".into()),
                band: Some("LTE BAND 20".into()),
                operator: Some("21401".into()),
                rssi_dbm: Some(-78),
                rsrp_dbm: Some(-104),
                rsrq_db: Some(-9.0),
                sinr_db: Some(11.0),
            }
        );
        // With CQI, tx_power and srxlev missing ("-").
        let c = parse_qeng(
            &["+QENG: \"servingcell\",\"NOCONN\",\"LTE\",\"FDD\",216,70,127328,189,476,1,3,3,D17,-104,-9,-77,18,-,-,-"],
            SinrScale::Db,
        )
        .unwrap();
        assert_eq!(c.band.as_deref(), Some("LTE BAND 1"));
        assert_eq!(c.cell_id.as_deref(), Some("127328"));
        assert_eq!(c.sinr_db, Some(18.0));
        // Fifths of a dB.
        let c = parse_qeng(
            &["+QENG: \"servingcell\",\"NOCONN\",\"LTE\",\"FDD\",505,02,12AED4A,445,3750,8,3,3,CBE8,-99,-14,-71,53,30"],
            SinrScale::FifthDb,
        )
        .unwrap();
        assert!((c.sinr_db.unwrap() - (-9.4)).abs() < 0.01);
    }

    #[test]
    fn qeng_other_states() {
        assert_eq!(
            parse_qeng(&["+QENG: \"servingcell\",\"SEARCH\""], SinrScale::Db),
            None
        );
        let c = parse_qeng(
            &["+QENG: \"servingcell\",\"NOCONN\",\"WCDMA\",262,01,4E4F,2A1B3C,10688,12,5,-90,-7,-,-,-,-,-"],
            SinrScale::Db,
        )
        .unwrap();
        assert_eq!(c.tech.as_deref(), Some("WCDMA"));
        assert_eq!(c.cell_id.as_deref(), Some("2A1B3C"));
        // EN-DC: the LTE anchor on its own line, then NR.
        let c = parse_qeng(
            &[
                "+QENG: \"servingcell\",\"NOCONN\"",
                "+QENG: \"LTE\",\"FDD\",310,260,1A2B3C4,123,5110,12,3,3,2F1,-95,-11,-65,9,10,20,-",
                "+QENG: \"NR5G-NSA\",310,260,500,-90,15,-11,632736,77,12,1",
            ],
            SinrScale::Db,
        )
        .unwrap();
        assert_eq!(c.tech.as_deref(), Some("NR5G"));
        assert_eq!(c.cell_id.as_deref(), Some("1A2B3C4"));
        assert_eq!(c.rsrp_dbm, Some(-95));
    }

    #[test]
    fn cpsi() {
        let c = parse_cpsi(
            "+CPSI: LTE,Online,460-01,0x7496,251941991,203,EUTRAN-BAND8,3740,3,3,-92,-672,-418,14",
        )
        .unwrap();
        assert_eq!(c.tech.as_deref(), Some("LTE"));
        assert_eq!(c.operator.as_deref(), Some("46001"));
        assert_eq!(c.cell_id.as_deref(), Some("F045467"));
        assert_eq!(c.band.as_deref(), Some("LTE BAND 8"));
        assert_eq!(c.rsrp_dbm, Some(-67));
        assert!((c.rsrq_db.unwrap() - (-9.2)).abs() < 0.01);
        assert_eq!(c.rssi_dbm, Some(-42));
        assert_eq!(c.sinr_db, Some(14.0));
        let c = parse_cpsi("+CPSI: GSM,Online,216-30,0x0D45,5513,10 EGSM,-75,0,40-40").unwrap();
        assert_eq!(c.tech.as_deref(), Some("GSM"));
        assert_eq!(c.cell_id.as_deref(), Some("1589"));
        assert_eq!(parse_cpsi("+CPSI: NO SERVICE,Online"), None);
        // Out-of-range values are dropped, not passed on.
        let c = parse_cpsi(
            "+CPSI: LTE,Online,460-11,0x774B,126375687,303,EUTRAN-BAND1,100,5,0,12,36,42,5",
        )
        .unwrap();
        assert_eq!((c.rsrp_dbm, c.rssi_dbm), (None, None));
    }

    #[test]
    fn apply_merges() {
        let mut t = Telemetry::default();
        apply(&mut t, Parser::Csq, &["+CSQ: 20,99".into()], SinrScale::Db);
        apply(
            &mut t,
            Parser::Cops,
            &["+COPS: 0,0,\"Telekom.de\",7".into()],
            SinrScale::Db,
        );
        apply(
            &mut t,
            Parser::Registration,
            &["+CEREG: 0,0".into()],
            SinrScale::Db,
        );
        apply(
            &mut t,
            Parser::Registration,
            &["+CREG: 0,5".into()],
            SinrScale::Db,
        );
        apply(
            &mut t,
            Parser::Qnwinfo,
            &["+QNWINFO: \"FDD LTE\",\"26201\",\"LTE BAND 3\",1300".into()],
            SinrScale::Db,
        );
        assert_eq!(t.rssi_dbm, Some(-73));
        assert_eq!(t.operator.as_deref(), Some("Telekom.de"));
        assert_eq!(t.access_tech.as_deref(), Some("LTE"));
        assert_eq!(t.registration, Some(Registration::Roaming));
        assert_eq!(t.band.as_deref(), Some("LTE BAND 3"));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(line in "\\PC{0,200}") {
            let _ = parse_csq(&line);
            let _ = parse_cops(&line);
            let _ = parse_registration_query(&line);
            let _ = parse_cgpaddr(&line);
            let _ = parse_cgact(&line);
            let _ = parse_qnwinfo(&line);
            let _ = parse_qeng(&[&line], SinrScale::FifthDb);
            let _ = parse_cpsi(&line);
            let _ = normalise_tech(&line);
        }

        #[test]
        fn prefixed_garbage_never_panics(
            prefix in prop_oneof![
                Just("+CSQ: "), Just("+COPS: "), Just("+CEREG: "), Just("+CGPADDR: "),
                Just("+QNWINFO: "), Just("+QENG: \"servingcell\",\"NOCONN\",\"LTE\","),
                Just("+CPSI: LTE,Online,"),
            ],
            rest in "[-0-9A-Fa-fx,\" .]{0,120}",
        ) {
            let line = format!("{prefix}{rest}");
            let mut t = Telemetry::default();
            for p in [Parser::Csq, Parser::Cops, Parser::Registration, Parser::Qnwinfo, Parser::Qeng, Parser::Cpsi] {
                apply(&mut t, p, std::slice::from_ref(&line), SinrScale::Db);
            }
            let _ = parse_cgpaddr(&line);
        }
    }
}
