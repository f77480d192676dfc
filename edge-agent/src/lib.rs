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

pub use config::AgentConfig;

/// Version string sent in `Hello`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
