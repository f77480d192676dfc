//! What each command answers, per modem model.
//!
//! Formats follow the vendors' manuals and captured outputs:
//! - Quectel `ATI` is three bare lines (`Quectel`, `EC25`, `Revision: …`);
//!   `AT+QENG="servingcell"` on LTE is `state,"LTE",duplex,MCC,MNC,cellID,
//!   PCID,EARFCN,band,UL bw,DL bw,TAC,RSRP,RSRQ,RSSI,SINR,srxlev`.
//! - SIMCom `AT+CPSI?` on LTE is `LTE,Online,MCC-MNC,TAC,cellID,PCID,
//!   EUTRAN-BANDn,EARFCN,DL bw,UL bw,RSRQ,RSRP,RSSI,RSSNR` (RSRQ, RSRP and
//!   RSSI in tenths of dB), `NO SERVICE,…` otherwise.
//! - Huawei stick firmware `AT^SYSINFOEX` is `srv_status,srv_domain,roam,
//!   sim_state,lock,sysmode,"name",submode,"name"` (6/101 for LTE);
//!   `AT^RESET` restarts the stick.

use std::time::Instant;

use super::SimModel;
use super::command::{self, Cmd, Kind};
use super::machine::{Final, Machine, Phase, Step};

/// The fixed identity of a simulated model.
#[derive(Clone, Debug)]
pub(super) struct Profile {
    pub model: SimModel,
    pub manufacturer: &'static str,
    pub model_name: &'static str,
    pub revision: &'static str,
    pub imei: String,
    pub imsi: String,
    /// What the module prints on its AT port after booting.
    pub boot_urcs: &'static [&'static str],
}

pub(super) fn profile(model: SimModel, imei: &str, plmn: &str) -> Profile {
    let (manufacturer, model_name, revision, boot_urcs): (_, _, _, &'static [&'static str]) =
        match model {
            SimModel::QuectelEc25 => (
                "Quectel",
                "EC25",
                "EC25EFAR06A06M4G",
                &[
                    "RDY",
                    "+CFUN: 1",
                    "+CPIN: READY",
                    "+QUSIM: 1",
                    "+QIND: SMS DONE",
                    "+QIND: PB DONE",
                ],
            ),
            SimModel::SimcomSim7600 => (
                "SIMCOM INCORPORATED",
                "SIMCOM_SIM7600E-H",
                "SIM7600M22_V2.0",
                &["RDY", "+CPIN: READY", "SMS DONE", "PB DONE"],
            ),
            SimModel::HuaweiStick => ("huawei", "E3372", "21.200.07.00.209", &[]),
            SimModel::Generic => ("Generic", "LTE Modem", "1.0.0", &[]),
        };
    let mut imsi: String = plmn.chars().filter(char::is_ascii_digit).collect();
    imsi.push_str("0123456789");
    imsi.truncate(15);
    Profile {
        model,
        manufacturer,
        model_name,
        revision,
        imei: imei.to_string(),
        imsi,
        boot_urcs,
    }
}

/// S3 = CR, S4 = LF, S5 = backspace; the rest zero.
pub(super) fn default_sregs() -> [u32; 16] {
    let mut s = [0; 16];
    s[3] = 13;
    s[4] = 10;
    s[5] = 8;
    s
}

/// `ERROR`, `+CME ERROR: 30` or `+CME ERROR: no network service`, as
/// `AT+CMEE` asks.
pub(super) fn final_text(f: Final, cmee: u8) -> String {
    match f {
        Final::Ok => "OK".into(),
        Final::Error => "ERROR".into(),
        Final::Cme(_) if cmee == 0 => "ERROR".into(),
        Final::Cme(code) if cmee == 2 => match cme_text(code) {
            Some(t) => format!("+CME ERROR: {t}"),
            None => format!("+CME ERROR: {code}"),
        },
        Final::Cme(code) => format!("+CME ERROR: {code}"),
    }
}

fn cme_text(code: u16) -> Option<&'static str> {
    Some(match code {
        3 => "operation not allowed",
        4 => "operation not supported",
        10 => "SIM not inserted",
        30 => "no network service",
        100 => "unknown",
        _ => return None,
    })
}

const TAC: &str = "1A2B";
const CELL_ID: &str = "1A2D101";
const CELL_ID_DEC: u32 = 0x1A2_D101;
const PCID: u32 = 123;
const EARFCN: u32 = 1300;
const BAND: u32 = 3;

fn mcc_mnc(m: &Machine) -> (&str, &str) {
    let plmn = m.opts.plmn.as_str();
    match (plmn.get(..3), plmn.get(3..)) {
        (Some(mcc), Some(mnc)) if !mnc.is_empty() => (mcc, mnc),
        _ => ("001", "01"),
    }
}

/// Signal figures derived from the CSQ index so all answers agree.
struct Signal {
    rssi: i32,
    rsrp: i32,
    rsrq: i32,
    sinr: i32,
}

fn signal(m: &Machine) -> Signal {
    let csq = i32::from(m.opts.csq.min(31));
    let rssi = -113 + 2 * csq;
    Signal {
        rssi,
        rsrp: rssi - 28,
        rsrq: -10,
        sinr: 12,
    }
}

/// `+CEREG: 1` (n=1) or `+CEREG: 1,"TAC","CI",7` (n=2, registered).
pub(super) fn reg_urc(m: &Machine, name: &str, n: u8) -> String {
    let stat = m.reg_stat();
    if n == 2 && stat == 1 {
        format!("{name}: {stat},\"{TAC}\",\"{CELL_ID}\",7")
    } else {
        format!("{name}: {stat}")
    }
}

fn reg_read(m: &Machine, name: &str, n: u8) -> String {
    let stat = m.reg_stat();
    if n == 2 && stat == 1 {
        format!("{name}: {n},{stat},\"{TAC}\",\"{CELL_ID}\",7")
    } else {
        format!("{name}: {n},{stat}")
    }
}

fn one(line: String) -> Step {
    Step::Info(vec![line])
}

fn ok() -> Step {
    Step::Info(vec![])
}

fn error() -> Step {
    Step::Fail(Final::Error)
}

/// Run one command against the machine.
pub(super) fn exec(m: &mut Machine, cmd: &Cmd, now: Instant) -> Step {
    match cmd {
        Cmd::Basic { name, arg } => basic(m, name, *arg),
        Cmd::SReg { n, set } => {
            let Some(slot) = m.sregs.get_mut(*n as usize) else {
                return error();
            };
            match set {
                Some(v) if *v <= 255 => {
                    *slot = *v;
                    ok()
                }
                Some(_) => error(),
                None => one(format!("{:03}", *slot)),
            }
        }
        Cmd::Ext { name, kind } => extended(m, name, kind, now),
    }
}

fn basic(m: &mut Machine, name: &str, arg: Option<u32>) -> Step {
    match (name, arg) {
        // V.250: a missing value means 0, so a bare `ATE` turns echo off.
        ("E", None | Some(0)) => {
            m.echo = false;
            ok()
        }
        ("E", Some(1)) => {
            m.echo = true;
            ok()
        }
        ("V", Some(1)) | ("Q", None | Some(0)) | ("&W", None | Some(0)) => ok(),
        ("H", None | Some(0)) => ok(),
        ("Z", None | Some(0)) | ("&F", None | Some(0)) => {
            m.default_settings();
            ok()
        }
        ("I", None | Some(0)) => Step::Info(ati(m)),
        ("I", Some(_)) => ok(),
        _ => error(),
    }
}

fn ati(m: &Machine) -> Vec<String> {
    let p = &m.profile;
    match p.model {
        SimModel::QuectelEc25 | SimModel::Generic => vec![
            p.manufacturer.to_string(),
            p.model_name.to_string(),
            format!("Revision: {}", p.revision),
        ],
        SimModel::SimcomSim7600 => vec![
            format!("Manufacturer: {}", p.manufacturer),
            format!("Model: {}", p.model_name),
            format!("Revision: {}", p.revision),
            format!("IMEI: {}", p.imei),
            "+GCAP: +CGSM".into(),
        ],
        SimModel::HuaweiStick => vec![
            format!("Manufacturer: {}", p.manufacturer),
            format!("Model: {}", p.model_name),
            format!("Revision: {}", p.revision),
            format!("IMEI: {}", p.imei),
            "+GCAP: +CGSM,+DS,+ES".into(),
        ],
    }
}

fn extended(m: &mut Machine, name: &str, kind: &Kind, now: Instant) -> Step {
    let model = m.profile.model;
    let set_args = match kind {
        Kind::Set(a) => command::args(a),
        _ => Vec::new(),
    };
    match (name, kind) {
        ("+CGMI" | "+GMI", Kind::Exec) => one(m.profile.manufacturer.into()),
        ("+CGMM" | "+GMM", Kind::Exec) => one(m.profile.model_name.into()),
        ("+CGMR" | "+GMR", Kind::Exec) => one(m.profile.revision.into()),
        ("+CGSN" | "+GSN", Kind::Exec) => one(m.profile.imei.clone()),
        ("+CIMI", Kind::Exec) => one(m.profile.imsi.clone()),
        (
            "+CGMI" | "+GMI" | "+CGMM" | "+GMM" | "+CGMR" | "+GMR" | "+CGSN" | "+GSN" | "+CIMI",
            Kind::Test,
        ) => ok(),
        ("+CPIN", Kind::Read) => one("+CPIN: READY".into()),

        ("+CSQ", Kind::Exec) => {
            let csq = if m.stats().radio_on {
                m.opts.csq.min(31)
            } else {
                99
            };
            one(format!("+CSQ: {csq},99"))
        }
        ("+CSQ", Kind::Test) => one("+CSQ: (0-31,99),(0-7,99)".into()),

        ("+COPS", Kind::Read) => {
            if m.reg_stat() == 1 {
                one(format!("+COPS: 0,0,\"{}\",7", m.opts.operator))
            } else {
                one("+COPS: 0".into())
            }
        }
        ("+COPS", Kind::Set(_) | Kind::Test) => ok(),

        ("+CREG" | "+CGREG" | "+CEREG", _) => {
            let i = match name {
                "+CREG" => 0,
                "+CGREG" => 1,
                _ => 2,
            };
            match kind {
                Kind::Read => one(reg_read(m, name, m.reg_urc[i])),
                Kind::Test => one(format!("{name}: (0-2)")),
                Kind::Set(_) => match command::num(&set_args, 0) {
                    Ok(Some(n @ 0..=2)) => {
                        m.reg_urc[i] = n as u8;
                        ok()
                    }
                    _ => error(),
                },
                Kind::Exec => error(),
            }
        }

        ("+CGATT", Kind::Read) => one(format!("+CGATT: {}", u8::from(m.reg_stat() == 1))),
        ("+CGATT", Kind::Test) => one("+CGATT: (0,1)".into()),

        ("+CGACT", Kind::Read) => one(format!("+CGACT: 1,{}", u8::from(m.pdp_active()))),
        ("+CGACT", Kind::Test) => one("+CGACT: (0,1)".into()),
        ("+CGACT", Kind::Set(_)) => {
            let state = command::num(&set_args, 0);
            let cid = command::num(&set_args, 1);
            match (state, cid) {
                (Ok(Some(s @ 0..=1)), Ok(None | Some(1))) if set_args.len() <= 2 => {
                    if s == 1 {
                        m.pdp_on(now)
                    } else {
                        m.pdp_off()
                    }
                }
                _ => error(),
            }
        }

        ("+CGPADDR", Kind::Exec) => one(cgpaddr(m)),
        ("+CGPADDR", Kind::Set(_)) => match command::num(&set_args, 0) {
            Ok(Some(1)) if set_args.len() == 1 => one(cgpaddr(m)),
            _ => error(),
        },
        ("+CGPADDR", Kind::Test) => one("+CGPADDR: (1)".into()),

        ("+CGDCONT", Kind::Read) => one(format!(
            "+CGDCONT: 1,\"IP\",\"{}\",\"0.0.0.0\",0,0",
            m.opts.apn
        )),
        ("+CGDCONT", Kind::Set(_) | Kind::Test) => ok(),

        ("+CFUN", Kind::Read) => {
            let fun = match m.phase {
                Phase::Off { fun } => fun,
                _ => 1,
            };
            one(format!("+CFUN: {fun}"))
        }
        ("+CFUN", Kind::Test) => one("+CFUN: (0,1,4),(0-1)".into()),
        ("+CFUN", Kind::Set(_)) => {
            let fun = command::num(&set_args, 0);
            let rst = command::num(&set_args, 1);
            match (fun, rst) {
                _ if set_args.len() > 2 => error(),
                (Ok(Some(1)), Ok(Some(1))) => Step::Reset,
                (Ok(Some(f @ (0 | 4))), Ok(None | Some(0))) => m.radio_off(f as u8),
                (Ok(Some(1)), Ok(None | Some(0))) => m.radio_on(now),
                _ => error(),
            }
        }

        ("+CMEE", Kind::Read) => one(format!("+CMEE: {}", m.cmee)),
        ("+CMEE", Kind::Test) => one("+CMEE: (0-2)".into()),
        ("+CMEE", Kind::Set(_)) => match command::num(&set_args, 0) {
            Ok(Some(n @ 0..=2)) => {
                m.cmee = n as u8;
                ok()
            }
            _ => error(),
        },

        // Quectel
        ("+QNWINFO", Kind::Exec) if model == SimModel::QuectelEc25 => {
            if m.reg_stat() == 1 {
                let (mcc, mnc) = mcc_mnc(m);
                one(format!(
                    "+QNWINFO: \"FDD LTE\",\"{mcc}{mnc}\",\"LTE BAND {BAND}\",{EARFCN}"
                ))
            } else {
                one("+QNWINFO: No Service".into())
            }
        }
        ("+QENG", Kind::Set(_)) if model == SimModel::QuectelEc25 => {
            match set_args.first().map(String::as_str) {
                Some("SERVINGCELL") if set_args.len() == 1 => one(qeng_servingcell(m)),
                Some("NEIGHBOURCELL") if set_args.len() == 1 => ok(),
                _ => error(),
            }
        }
        ("+QNWINFO" | "+QENG", Kind::Test) if model == SimModel::QuectelEc25 => ok(),

        // SIMCom
        ("+CPSI", Kind::Read) if model == SimModel::SimcomSim7600 => one(cpsi(m)),
        ("+CPSI", Kind::Test) if model == SimModel::SimcomSim7600 => ok(),
        ("+CRESET", Kind::Exec) if model == SimModel::SimcomSim7600 => Step::Reset,
        ("+CNMP", Kind::Read) if model == SimModel::SimcomSim7600 => one("+CNMP: 2".into()),
        ("+CNMP", Kind::Set(_)) if model == SimModel::SimcomSim7600 => {
            match command::num(&set_args, 0) {
                Ok(Some(2 | 13 | 14 | 38 | 48 | 51 | 54 | 71)) => ok(),
                _ => error(),
            }
        }

        // Huawei stick mode
        ("^SYSINFOEX", Kind::Exec) if model == SimModel::HuaweiStick => one(sysinfoex(m)),
        ("^RESET", Kind::Exec) if model == SimModel::HuaweiStick => Step::Reset,

        _ => error(),
    }
}

fn cgpaddr(m: &Machine) -> String {
    if m.pdp_active() {
        format!("+CGPADDR: 1,\"{}\"", m.private_ip())
    } else {
        "+CGPADDR: 1".into()
    }
}

fn qeng_servingcell(m: &Machine) -> String {
    if m.reg_stat() != 1 {
        return "+QENG: \"servingcell\",\"SEARCH\"".into();
    }
    let (mcc, mnc) = mcc_mnc(m);
    let s = signal(m);
    let srxlev = (s.rsrp + 140).max(0);
    format!(
        "+QENG: \"servingcell\",\"NOCONN\",\"LTE\",\"FDD\",{mcc},{mnc},{CELL_ID},{PCID},{EARFCN},\
         {BAND},5,5,{TAC},{},{},{},{},{srxlev}",
        s.rsrp, s.rsrq, s.rssi, s.sinr
    )
}

fn cpsi(m: &Machine) -> String {
    match m.phase {
        Phase::Off { .. } => "+CPSI: NO SERVICE,Low Power Mode".into(),
        _ if m.reg_stat() != 1 => "+CPSI: NO SERVICE,Online".into(),
        _ => {
            let (mcc, mnc) = mcc_mnc(m);
            let s = signal(m);
            format!(
                "+CPSI: LTE,Online,{mcc}-{mnc},0x{TAC},{CELL_ID_DEC},{PCID},EUTRAN-BAND{BAND},\
                 {EARFCN},5,5,{},{},{},{}",
                s.rsrq * 10,
                s.rsrp * 10,
                s.rssi * 10,
                s.sinr
            )
        }
    }
}

fn sysinfoex(m: &Machine) -> String {
    if m.reg_stat() == 1 {
        "^SYSINFOEX: 2,3,0,1,,6,\"LTE\",101,\"LTE\"".into()
    } else {
        "^SYSINFOEX: 0,0,0,1,,0,\"NO SERVICE\",0,\"NO SERVICE\"".into()
    }
}
