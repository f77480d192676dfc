//! Types and codecs shared by the cellgate control plane and edge agent.
//!
//! Concepts:
//! - **frame**: a length-prefixed postcard message (`u32` big-endian length,
//!   then the payload). Every message on the tunnel travels as a frame, and a
//!   frame never exceeds [`wire::MAX_FRAME_LEN`].
//! - **control stream**: the first bidirectional QUIC stream an agent opens;
//!   carries [`wire::ControlMsg`] frames (hello, heartbeats, commands).
//! - **data stream**: one bidirectional QUIC stream per customer flow, opened
//!   by the control plane; starts with one [`wire::StreamMsg::Open`] frame and
//!   one answer frame, then carries raw bytes both ways.
//! - **target**: where a customer wants to go, a domain or an IP plus a port
//!   ([`target::TargetAddr`]). Domains are resolved on the device.
//! - **policy**: the deny list applied to customer targets ([`policy`]).
//! - **release**: an agent build the control plane signed; its manifest
//!   format is in [`release`].
//!
//! Everything outside the `quic` feature is pure: bytes in, values out.
#![forbid(unsafe_code)]

pub mod config_file;
pub mod enroll;
pub mod files;
pub mod mqtt;
pub mod policy;
pub mod release;
pub mod target;
pub mod wire;

#[cfg(feature = "quic")]
pub mod quic;

#[cfg(feature = "cli")]
pub mod process;
