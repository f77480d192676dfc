//! The cellgate control plane.
//!
//! Concepts:
//! - **customer**: someone who uses the proxy (username + argon2id hash).
//! - **device / exit**: an enrolled edge agent; while its QUIC tunnel is up
//!   it is *online* and customer flows can leave through it.
//! - **flow**: one customer connection, carried to an exit on one QUIC
//!   stream ([`proxy::exit`]).
//! - **enrollment token**: a one-time secret an admin gives a new device,
//!   traded for a client certificate signed by the control plane's CA
//!   ([`pki`], [`agents`]).
//! - **admin token**: bearer token for the REST API ([`api`]).
//!
//! - **release**: an agent binary signed with the control plane's release
//!   key; devices update to it one by one or in rollouts ([`release`]).
//!
//! [`app::start`] wires everything; `main.rs` is the CLI.
#![forbid(unsafe_code)]

pub mod agents;
pub mod api;
pub mod app;
pub mod commands;
pub mod config;
pub mod demo;
pub mod limits;
pub mod metrics;
pub mod mqtt;
pub mod pki;
pub mod ports;
pub mod proxy;
pub mod registry;
pub mod release;
pub mod rotation;
pub mod routing;
pub mod state;
pub mod store;
pub mod tokens;
pub mod usage;
pub mod webhooks;

pub use config::Config;
