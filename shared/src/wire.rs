//! The tunnel's wire protocol: messages and the frame codec.
//!
//! A frame is a `u32` big-endian payload length followed by a postcard
//! payload of at most [`MAX_FRAME_LEN`] bytes. The codec is pure: it reads
//! from and writes to byte buffers, and "need more bytes" is `Ok(None)`.

mod control;
mod frame;
mod stream;
mod version;

pub use control::*;
pub use frame::*;
pub use stream::*;
pub use version::*;

/// ALPN protocol identifier of the tunnel.
pub const ALPN: &[u8] = b"cellgate/1";

/// QUIC application error codes used when closing a connection or stream.
pub mod close_code {
    /// Normal shutdown.
    pub const NORMAL: u32 = 0;
    /// A peer spoke a protocol version we cannot speak.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A frame could not be decoded or came out of order.
    pub const PROTOCOL_ERROR: u32 = 2;
    /// The device was disabled or deleted by an administrator.
    pub const DEVICE_DISABLED: u32 = 3;
    /// The credential is not known (deleted device, foreign certificate).
    pub const UNKNOWN_DEVICE: u32 = 4;
    /// Heartbeats stopped arriving.
    pub const HEARTBEAT_TIMEOUT: u32 = 5;
    /// The same device connected again; this older session is replaced.
    pub const REPLACED: u32 = 6;
    /// Enrollment finished or was refused.
    pub const ENROLL_DONE: u32 = 7;
    /// Stream reset: the other side of the relay failed.
    pub const STREAM_ABORTED: u32 = 16;
}

/// TLS server name the control plane's certificate is issued for. Agents
/// dial an address from their enrollment token and verify the certificate
/// against this name and the control plane's private CA, never a public one.
pub const SERVER_NAME: &str = "control-plane.cellgate.internal";
