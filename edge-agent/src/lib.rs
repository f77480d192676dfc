//! The cellgate edge agent.
//!
//! Concepts:
//! - **state dir**: where an enrolled agent keeps its identity: its private
//!   key (never leaves the device), its certificate signed by the control
//!   plane's CA, the CA certificate, and the control plane's address.
//! - **enrollment**: trading a one-time token for that identity
//!   ([`enroll::enroll`]).
//! - **tunnel**: one QUIC connection to the control plane, re-established
//!   with backoff ([`tunnel::run`]).
//! - **flow**: one customer connection, carried by one QUIC stream the
//!   control plane opens; the agent resolves, checks the deny list, dials
//!   and relays ([`forward`]).
//!
//! - **self-update**: replacing the agent's binary with a release signed
//!   by the control plane, with rollback when the new binary does not
//!   reach the control plane ([`update`]).
//!
//! The crate is a library so the control plane's demo mode can run an agent
//! in-process; `main.rs` is a thin CLI on top.
#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod enroll;
pub mod exits;
pub mod forward;
pub mod identity;
pub mod mqtt;
pub mod net;
pub mod rotate;
pub mod tls;
pub mod tunnel;
pub mod update;

pub use config::AgentConfig;

/// Version string sent in `Hello` and printed by `--version`. A build may
/// set it with the `CELLGATE_AGENT_VERSION` environment variable (cargo
/// rebuilds the agent when it changes); the crate version otherwise.
pub const AGENT_VERSION: &str = match option_env!("CELLGATE_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The target triple this agent was built for (a self-update must match).
pub const AGENT_TARGET: &str = env!("CELLGATE_AGENT_TARGET");
