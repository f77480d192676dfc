//! Protocol version negotiation: each side states the range it speaks and
//! the highest common version wins.

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "incompatible protocol versions: peer speaks {peer_min}..={peer_max}, we speak {ours_min}..={ours_max}; upgrade the {older}"
)]
pub struct VersionError {
    pub peer_min: u16,
    pub peer_max: u16,
    pub ours_min: u16,
    pub ours_max: u16,
    /// Which side should be upgraded: "peer" or "local side".
    pub older: &'static str,
}

/// Pick the highest version both ranges contain.
pub fn negotiate(
    ours_min: u16,
    ours_max: u16,
    peer_min: u16,
    peer_max: u16,
) -> Result<u16, VersionError> {
    let lo = ours_min.max(peer_min);
    let hi = ours_max.min(peer_max);
    if peer_min <= peer_max && lo <= hi {
        Ok(hi)
    } else {
        Err(VersionError {
            peer_min,
            peer_max,
            ours_min,
            ours_max,
            older: if peer_max < ours_min {
                "peer"
            } else {
                "local side"
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common() {
        assert_eq!(negotiate(1, 3, 2, 5), Ok(3));
        assert_eq!(negotiate(1, 1, 1, 1), Ok(1));
        let e = negotiate(2, 3, 1, 1).unwrap_err();
        assert_eq!(e.older, "peer");
        assert!(e.to_string().contains("upgrade the peer"));
        assert_eq!(negotiate(1, 1, 2, 4).unwrap_err().older, "local side");
        assert!(negotiate(1, 5, 4, 3).is_err(), "inverted peer range");
    }
}
