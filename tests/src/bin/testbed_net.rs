//! `testbed_net`: one uplink of a netns testbed, driven from a shell.
//!
//! Fakes written as scripts (an Android `cmd` that toggles airplane mode,
//! a modem tool) cannot call the testbed in-process. They get the uplink's
//! state file from the test and run, for example:
//!
//! ```text
//! testbed_net --state /run/cellgate-testbed/slot-3/uplink-0.json data-down
//! testbed_net --state ... data-up [--same-ip]   # prints the public address
//! testbed_net --state ... public-ip
//! ```
//!
//! `testbed_net sweep` removes what killed test runs left in slots that no
//! bed holds.
//!
//! The operations are the ones the in-process `Uplink` performs, on the
//! same state file under the same lock, so both stay consistent.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tests::testbed::netns::{Uplink, sweep_unused_slots};

#[derive(Parser, Debug)]
#[command(about = "Act on one uplink of a cellgate netns testbed")]
struct Args {
    /// The uplink's state file (`Bed::uplink_state_file`); every
    /// operation but `sweep` needs it.
    #[arg(long)]
    state: Option<PathBuf>,
    #[command(subcommand)]
    op: Op,
}

#[derive(Subcommand, Debug)]
enum Op {
    /// The data session ends: the device's interface goes down.
    DataDown,
    /// The data session comes back, with a new public address unless
    /// `--same-ip`. Prints the public address.
    DataUp {
        #[arg(long)]
        same_ip: bool,
    },
    /// Print the current public address.
    PublicIp,
    /// Print the device's current private address on this uplink.
    HostAddr,
    /// Print `up` or `down`.
    Status,
    /// Give the device a new private address without an outage. Prints it.
    HotSwap,
    /// Down for MILLIS milliseconds, then up with the same public address.
    Flap {
        millis: u64,
        #[arg(long)]
        new_host_addr: bool,
    },
    /// Drop PERCENT % of the uplink's packets each way (0 to stop).
    SetLoss { percent: u8 },
    /// Print the whole state as JSON.
    Show,
    /// Remove the namespaces and interfaces of every slot no bed holds.
    Sweep,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Op::Sweep = args.op {
        return finish(sweep_unused_slots().map(|slots| Some(format!("swept slots {slots:?}"))));
    }
    let Some(state) = args.state else {
        eprintln!("testbed_net: --state FILE is required");
        return ExitCode::from(2);
    };
    let link = Uplink::open(state);
    let result = match args.op {
        Op::DataDown => link.try_data_down().map(|()| None),
        Op::DataUp { same_ip } => link.try_data_up(!same_ip).map(|ip| Some(ip.to_string())),
        Op::PublicIp => link.try_public_ip().map(|ip| Some(ip.to_string())),
        Op::HostAddr => link.state().map(|st| Some(st.host_addr().to_string())),
        Op::Status => link
            .state()
            .map(|st| Some(if st.data_up { "up" } else { "down" }.to_string())),
        Op::HotSwap => link.try_hot_swap_host_addr().map(|ip| Some(ip.to_string())),
        Op::Flap {
            millis,
            new_host_addr,
        } => link
            .try_link_flap(Duration::from_millis(millis), new_host_addr)
            .map(|()| None),
        Op::SetLoss { percent } => link.try_set_loss(percent).map(|()| None),
        Op::Show => link.state().map(|st| Some(st.to_json())),
        Op::Sweep => unreachable!("handled above"),
    };
    finish(result)
}

fn finish(result: anyhow::Result<Option<String>>) -> ExitCode {
    match result {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("testbed_net: {e:#}");
            ExitCode::FAILURE
        }
    }
}
