//! QUIC plumbing used by both binaries (feature `quic`): transport tuning,
//! framed message streams and the byte relay between a TCP socket and a
//! QUIC stream.

pub mod framed;
pub mod relay;
pub mod transport;
