//! Reading and writing whole frames on QUIC streams.

use bytes::BytesMut;
use quinn::{ReadError, RecvStream, SendStream, WriteError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::{FrameError, MAX_FRAME_LEN, decode_frame, frame_to_vec};

#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] WriteError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

/// Read the next frame. `Ok(None)` is a clean end of stream between frames.
/// Bytes after the frame stay in `buf` (on a data stream they are the first
/// relayed bytes).
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<T>, FramedError> {
    loop {
        if let Some(msg) = decode_frame(buf)? {
            return Ok(Some(msg));
        }
        match recv.read_chunk(MAX_FRAME_LEN, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None if buf.is_empty() => return Ok(None),
            None => return Err(FramedError::Truncated),
        }
    }
}

pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), FramedError> {
    let bytes = frame_to_vec(msg)?;
    send.write_all(&bytes).await?;
    Ok(())
}
