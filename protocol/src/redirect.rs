//! Where to send instead: the message of a `not_leader` ERROR frame.
//!
//! A broker that holds a replica of a stream's shard but does not lead it
//! rejects PRODUCE frames with [`crate::ErrorCode::NotLeader`], and the
//! ERROR frame's message names the leader's data address for that shard:
//! `leader=IP:PORT` (for example `leader=127.0.0.2:7101`), or `leader=`
//! when this broker does not know a leader (an election is under way).
//! The client sends the rejected frames (and everything after them) again
//! to that address, or tries its other brokers when none is named.

use std::net::SocketAddr;

/// The message prefix.
const PREFIX: &[u8] = b"leader=";

/// Longest encoded hint (an IPv6 address with scope and port fits).
pub const LEADER_HINT_MAX: usize = 72;

/// A `not_leader` message, built once when a shard's leader changes and
/// sent as is with every rejection (no allocation per frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderHint {
    bytes: [u8; LEADER_HINT_MAX],
    len: usize,
}

impl LeaderHint {
    /// The hint naming `leader`, or saying none is known.
    pub fn new(leader: Option<SocketAddr>) -> Self {
        let mut hint = Self {
            bytes: [0; LEADER_HINT_MAX],
            len: 0,
        };
        hint.push(PREFIX);
        if let Some(addr) = leader {
            let text = addr.to_string();
            hint.push(text.as_bytes());
        }
        hint
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = LEADER_HINT_MAX - self.len;
        let take = bytes.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
    }

    /// The message bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Default for LeaderHint {
    fn default() -> Self {
        Self::new(None)
    }
}

/// Read a `not_leader` message: `Some(Some(addr))` when it names a leader,
/// `Some(None)` when it says none is known, `None` when it is not a hint.
pub fn parse_leader_hint(message: &[u8]) -> Option<Option<SocketAddr>> {
    let rest = message.strip_prefix(PREFIX)?;
    if rest.is_empty() {
        return Some(None);
    }
    let text = std::str::from_utf8(rest).ok()?;
    text.parse().ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_and_garbage_is_not_a_hint() {
        let v4: SocketAddr = "127.0.0.2:7101".parse().unwrap();
        let hint = LeaderHint::new(Some(v4));
        assert_eq!(hint.as_bytes(), b"leader=127.0.0.2:7101");
        assert_eq!(parse_leader_hint(hint.as_bytes()), Some(Some(v4)));
        let v6: SocketAddr = "[fe80::1:2:3:4]:65535".parse().unwrap();
        assert_eq!(
            parse_leader_hint(LeaderHint::new(Some(v6)).as_bytes()),
            Some(Some(v6))
        );
        assert_eq!(
            parse_leader_hint(LeaderHint::new(None).as_bytes()),
            Some(None)
        );
        assert_eq!(parse_leader_hint(b"not_leader"), None);
        assert_eq!(parse_leader_hint(b"leader=nonsense"), None);
        assert_eq!(parse_leader_hint(b"leader=\xff\xfe"), None);
    }
}
