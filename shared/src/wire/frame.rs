//! Length-prefixed postcard frames.

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest payload a frame may carry. Control messages are small; the limit
/// bounds what a misbehaving peer can make us buffer.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame payload: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Append one frame holding `msg` to `dst`.
pub fn encode_frame<T: Serialize>(msg: &T, dst: &mut BytesMut) -> Result<(), FrameError> {
    let payload = postcard::to_stdvec(msg)?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(payload.len()));
    }
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_u32(payload.len() as u32);
    dst.put_slice(&payload);
    Ok(())
}

/// One frame as a fresh vector.
pub fn frame_to_vec<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut b = BytesMut::new();
    encode_frame(msg, &mut b)?;
    Ok(b.to_vec())
}

/// How many bytes the frame at the start of `src` needs in total, if its
/// header is complete. Rejects oversized frames before anything is buffered.
pub fn frame_len(src: &[u8]) -> Result<Option<usize>, FrameError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(HEADER_LEN + len))
}

/// Take one frame from the front of `src`. `Ok(None)` means more bytes are
/// needed; `src` is left untouched then. On success exactly the frame's bytes
/// are consumed, so whatever follows (raw stream data) stays in `src`.
pub fn decode_frame<T: DeserializeOwned>(src: &mut BytesMut) -> Result<Option<T>, FrameError> {
    let Some(total) = frame_len(src)? else {
        return Ok(None);
    };
    if src.len() < total {
        return Ok(None);
    }
    let msg = postcard::from_bytes(&src[HEADER_LEN..total]);
    src.advance(total);
    Ok(Some(msg?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ControlMsg, Heartbeat};

    #[test]
    fn incomplete_is_not_an_error() {
        let msg = ControlMsg::Heartbeat(Heartbeat::default());
        let bytes = frame_to_vec(&msg).unwrap();
        for cut in 0..bytes.len() {
            let mut b = BytesMut::from(&bytes[..cut]);
            assert!(decode_frame::<ControlMsg>(&mut b).unwrap().is_none());
            assert_eq!(b.len(), cut);
        }
        let mut b = BytesMut::from(&bytes[..]);
        b.extend_from_slice(b"tail");
        assert_eq!(decode_frame::<ControlMsg>(&mut b).unwrap(), Some(msg));
        assert_eq!(&b[..], b"tail");
    }

    #[test]
    fn oversized_header_is_refused_early() {
        let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode_frame::<ControlMsg>(&mut b),
            Err(FrameError::TooLarge(_))
        ));
    }
}
