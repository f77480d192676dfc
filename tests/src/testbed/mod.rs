//! The device testbed: simulated devices in network namespaces, and
//! stand-ins for the hardware that cannot exist here (a modem on a
//! pseudo-terminal, a HiLink stick's web API, an Android phone's shell).
//!
//! - [`netns`]: a device host namespace with N uplinks, each through its own
//!   carrier namespace that NATs it to the root namespace (the "internet",
//!   where the control plane, the targets and the IP-echo endpoint live).
//!   Rotating changes the public address the internet sees.
//! - [`modem_sim`]: a modem speaking AT on a pty, with realistic delays,
//!   "same IP" soft rotations and injected faults.
//! - [`hilink_emu`]: a small Huawei HiLink API emulator.
//! - [`android_fake`]: fake `cmd`, `svc`, `settings`, `dumpsys` and `adb`
//!   on PATH that behave like a phone.
//!
//! The simulators act on the network through [`ModemLink`], which
//! [`netns`] implements for one uplink.

pub mod android_fake;
pub mod dns_server;
pub mod hilink_emu;
pub mod modem_sim;
pub mod netns;

/// What a simulated device does to its uplink when its radio or data
/// session changes. Calls block (they run `ip`/`nft` commands); call them
/// from a blocking context.
pub trait ModemLink: Send + Sync + 'static {
    /// The data session went down (PDP deactivated, radio off, reset,
    /// airplane mode): the uplink stops carrying traffic.
    fn data_down(&self);
    /// The data session came back. With `new_ip` false the carrier hands
    /// back the previous public address (the case that makes a naive
    /// rotation report success without a change).
    fn data_up(&self, new_ip: bool);
    /// The public address the internet currently sees for this uplink.
    fn public_ip(&self) -> std::net::Ipv4Addr;
}

/// A [`ModemLink`] that only records calls, for simulator unit tests.
#[derive(Default)]
pub struct RecordingLink {
    pub events: std::sync::Mutex<Vec<String>>,
    pub ip: std::sync::Mutex<u8>,
}

impl ModemLink for RecordingLink {
    fn data_down(&self) {
        self.events.lock().unwrap().push("down".into());
    }
    fn data_up(&self, new_ip: bool) {
        if new_ip {
            *self.ip.lock().unwrap() += 1;
        }
        self.events
            .lock()
            .unwrap()
            .push(format!("up new_ip={new_ip}"));
    }
    fn public_ip(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(198, 51, 100, *self.ip.lock().unwrap())
    }
}
