//! End-to-end harness for cellgate: the real `control-plane` and
//! `edge-agent` binaries as separate processes, driven by real `curl` and
//! by raw sockets, against local target servers.
//!
//! Glossary:
//! - **cluster**: one control plane in a fresh temporary data directory,
//!   one customer, and N enrolled edge agents ([`Cluster`]).
//! - **target**: a local server customers reach *through* the proxy
//!   ([`FileServer`], [`Sentinel`]).
//! - **bounded**: every wait in here has a deadline; a test that cannot make
//!   progress fails with the tail of every process log instead of hanging.
//!
//! Everything binds `127.0.0.1:0`, every child process is killed when its
//! handle drops (also when a test panics), and temporary directories are
//! removed (set `CELLGATE_E2E_KEEP=1` to keep them).
//!
//! The binaries are not built by this crate: run `cargo build --workspace`
//! first (or point `CELLGATE_CONTROL_PLANE_BIN` / `CELLGATE_EDGE_AGENT_BIN`
//! at them).
#![forbid(unsafe_code)]

pub mod harness {
    pub mod api;
    pub mod cluster;
    pub mod curl;
    pub mod mosquitto;
    pub mod postgres;
    pub mod process;
    pub mod socks;
    pub mod targets;
    pub mod temp;
    pub mod wait;
}

pub mod testbed;

pub use harness::api::{Api, ApiResponse, raw_exchange};
pub use harness::cluster::{Addrs, Agent, AgentLaunch, Cluster, ClusterOpts};
pub use harness::curl::{Curl, CurlResult, CurlRun, curl};
pub use harness::mosquitto::Mosquitto;
pub use harness::postgres::Postgres;
pub use harness::process::{Proc, control_plane_bin, edge_agent_bin, raise_fd_limit, run_bounded};
pub use harness::socks::{SocksOutcome, SocksTarget, socks5_attempt};
pub use harness::targets::{Blob, FileServer, Sentinel, TlsMaterial, sha256_file, sha256_hex};
pub use harness::temp::TempDir;
pub use harness::wait::eventually;

/// Fail the test unless `cond` becomes true within `timeout`, re-evaluating
/// it every 50 ms. The message is formatted like `panic!`'s.
///
/// ```ignore
/// assert_eventually!(Duration::from_secs(5), cluster.online() == 2, "agents never came online");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr, $($msg:tt)+) => {{
        let __timeout: ::std::time::Duration = $timeout;
        let __start = ::std::time::Instant::now();
        loop {
            if $cond {
                break __start.elapsed();
            }
            if __start.elapsed() >= __timeout {
                panic!(
                    "condition `{}` still false after {:?}: {}",
                    stringify!($cond),
                    __timeout,
                    format!($($msg)+)
                );
            }
            ::std::thread::sleep(::std::time::Duration::from_millis(50));
        }
    }};
}
