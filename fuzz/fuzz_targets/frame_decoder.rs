//! Tunnel frames: decoding any bytes as any message type never panics,
//! consumes exactly one frame, and what decodes re-encodes to the same
//! message.
#![no_main]

use std::fmt::Debug;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::wire::{
    ControlMsg, EnrollMsg, FrameError, HEADER_LEN, MAX_FRAME_LEN, StreamMsg, decode_frame,
    frame_len, frame_to_vec,
};

fuzz_target!(|data: &[u8]| {
    decode_all::<ControlMsg>(data);
    decode_all::<StreamMsg>(data);
    decode_all::<EnrollMsg>(data);
    // The same bytes as one payload behind a matching header, so the
    // fuzzer reaches postcard without having to guess the length.
    if data.len() <= MAX_FRAME_LEN {
        let mut framed = (data.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(data);
        decode_all::<ControlMsg>(&framed);
        decode_all::<StreamMsg>(&framed);
        decode_all::<EnrollMsg>(&framed);
    }
});

/// Decode frames back to back until the input runs out or one fails.
fn decode_all<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        let expected = frame_len(&buf);
        match decode_frame::<T>(&mut buf) {
            Ok(Some(msg)) => {
                let total = expected.unwrap().unwrap();
                assert!((HEADER_LEN..=HEADER_LEN + MAX_FRAME_LEN).contains(&total));
                assert_eq!(buf.len(), before - total);
                let again = frame_to_vec(&msg).expect("a decoded message re-encodes");
                let mut again = BytesMut::from(&again[..]);
                assert_eq!(decode_frame::<T>(&mut again).unwrap().as_ref(), Some(&msg));
                assert!(again.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf.len(), before);
                return;
            }
            Err(FrameError::TooLarge(n)) => {
                assert!(n > MAX_FRAME_LEN);
                assert_eq!(buf.len(), before);
                return;
            }
            Err(FrameError::Malformed(_)) => return,
        }
    }
}
