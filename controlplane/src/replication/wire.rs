//! The replication wire format: length-prefixed frames over TCP, all
//! integers little-endian. Encoders append to the caller's buffer; the
//! decoder borrows records from the caller's buffer (no copy, no allocation).
//!
//! ```text
//!  frame   offset  size  field
//!               0     4  len      bytes after this field (kind + body)
//!               4     1  kind     1 HELLO, 2 PLAN, 3 DATA, 4 ACK
//!               5     -  body
//!
//!  HELLO (follower -> leader, first frame), 37 bytes
//!          0  4  magic        "KXR1"
//!          4  4  shard        shard id
//!          8  8  node_id      the follower's node id
//!         16  8  position     where the follower's log ends
//!         24  1  has_last     1 when the next two fields are set
//!         25  8  last_pos     position of the follower's last record
//!         33  4  last_crc     that record's header CRC
//!
//!  PLAN (leader -> follower, answer to HELLO), 9 bytes
//!          0  1  code         0 resume, 1 truncate, 2 unavailable,
//!                             3 unknown shard, 4 not a replica of the shard
//!          1  8  value        resume: position; truncate: first segment to
//!                             drop; unavailable: leader's first position
//!
//!  DATA (leader -> follower, after a resume), 24 bytes + records
//!          0  8  position      log position of the first record byte
//!          8  8  commit        the leader's `replicated` commit position
//!         16  8  commit_synced the leader's `replicated_fsync` commit position
//!         24  -  records       whole log records as stored (may be empty:
//!                              a commit update)
//!
//!  ACK (follower -> leader), 16 bytes
//!          0  8  appended     the follower's appended position
//!          8  8  synced       the follower's fsynced position
//! ```

/// "KXR1" in a HELLO.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KXR1");
/// Bytes before a frame's body (len and kind).
pub const FRAME_HEADER_LEN: usize = 5;
/// Largest frame accepted (a batch record is at most a segment, 4 GiB by
/// configuration, 64 MiB by default; chunks are much smaller).
pub const FRAME_MAX: usize = 1 << 30;

const KIND_HELLO: u8 = 1;
const KIND_PLAN: u8 = 2;
const KIND_DATA: u8 = 3;
const KIND_ACK: u8 = 4;
const HELLO_LEN: usize = 37;
const PLAN_LEN: usize = 9;
const DATA_HEADER_LEN: usize = 24;
const ACK_LEN: usize = 16;

/// What a PLAN frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Send from this position.
    Resume(u64),
    /// Drop segments from this one, then reconnect.
    Truncate(u64),
    /// The leader no longer holds what the follower needs; its first position.
    Unavailable(u64),
    /// The leader does not lead this shard.
    UnknownShard,
    /// The node is not in the shard's replica set.
    NotAReplica,
}

/// One decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Follower's first frame.
    Hello {
        /// Shard id.
        shard: u32,
        /// Follower's node id.
        node_id: u64,
        /// Where its log ends.
        position: u64,
        /// Its last record: position and header CRC.
        last_record: Option<(u64, u32)>,
    },
    /// Leader's answer.
    Plan(Plan),
    /// Records and the commit positions.
    Data {
        /// Position of the first record byte.
        position: u64,
        /// `replicated` commit position.
        commit: u64,
        /// `replicated_fsync` commit position.
        commit_synced: u64,
        /// Whole records.
        records: &'a [u8],
    },
    /// Follower's positions.
    Ack {
        /// Appended position.
        appended: u64,
        /// Fsynced position.
        synced: u64,
    },
}

/// A frame that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Declared length beyond [`FRAME_MAX`] or below the kind byte.
    #[error("frame length {len} out of range (1..={FRAME_MAX})")]
    Length {
        /// Declared length.
        len: usize,
    },
    /// Unknown kind byte.
    #[error("unknown frame kind {kind}")]
    Kind {
        /// The byte.
        kind: u8,
    },
    /// A body shorter than its kind needs, or a bad field.
    #[error("bad {what} frame: {reason}")]
    Body {
        /// The frame kind.
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn frame_header(out: &mut Vec<u8>, kind: u8, body_len: usize) {
    out.extend_from_slice(&((body_len + 1) as u32).to_le_bytes());
    out.push(kind);
}

/// Append a HELLO frame.
pub fn encode_hello(
    out: &mut Vec<u8>,
    shard: u32,
    node_id: u64,
    position: u64,
    last_record: Option<(u64, u32)>,
) {
    frame_header(out, KIND_HELLO, HELLO_LEN);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&shard.to_le_bytes());
    out.extend_from_slice(&node_id.to_le_bytes());
    out.extend_from_slice(&position.to_le_bytes());
    let (pos, crc) = last_record.unwrap_or((0, 0));
    out.push(u8::from(last_record.is_some()));
    out.extend_from_slice(&pos.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Append a PLAN frame.
pub fn encode_plan(out: &mut Vec<u8>, plan: Plan) {
    let (code, value) = match plan {
        Plan::Resume(value) => (0u8, value),
        Plan::Truncate(value) => (1, value),
        Plan::Unavailable(value) => (2, value),
        Plan::UnknownShard => (3, 0),
        Plan::NotAReplica => (4, 0),
    };
    frame_header(out, KIND_PLAN, PLAN_LEN);
    out.push(code);
    out.extend_from_slice(&value.to_le_bytes());
}

/// Append a DATA frame carrying `records` (one copy into `out`).
pub fn encode_data(
    out: &mut Vec<u8>,
    position: u64,
    commit: u64,
    commit_synced: u64,
    records: &[u8],
) {
    frame_header(out, KIND_DATA, DATA_HEADER_LEN + records.len());
    out.extend_from_slice(&position.to_le_bytes());
    out.extend_from_slice(&commit.to_le_bytes());
    out.extend_from_slice(&commit_synced.to_le_bytes());
    out.extend_from_slice(records);
}

/// Append an ACK frame.
pub fn encode_ack(out: &mut Vec<u8>, appended: u64, synced: u64) {
    frame_header(out, KIND_ACK, ACK_LEN);
    out.extend_from_slice(&appended.to_le_bytes());
    out.extend_from_slice(&synced.to_le_bytes());
}

/// Decode the frame at the start of `buf`: `Ok(None)` when it is not
/// complete yet (read more), otherwise the message and the bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Message<'_>, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32_at(buf, 0) as usize;
    if len == 0 || len > FRAME_MAX {
        return Err(WireError::Length { len });
    }
    let total = 4 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let kind = buf[4];
    let body = &buf[FRAME_HEADER_LEN..total];
    let exact = |what, want: usize| {
        if body.len() == want {
            Ok(())
        } else {
            Err(WireError::Body {
                what,
                reason: "wrong length",
            })
        }
    };
    let message = match kind {
        KIND_HELLO => {
            exact("hello", HELLO_LEN)?;
            if u32_at(body, 0) != MAGIC {
                return Err(WireError::Body {
                    what: "hello",
                    reason: "bad magic",
                });
            }
            let last_record = match body[24] {
                0 => None,
                1 => Some((u64_at(body, 25), u32_at(body, 33))),
                _ => {
                    return Err(WireError::Body {
                        what: "hello",
                        reason: "has_last is neither 0 nor 1",
                    });
                }
            };
            Message::Hello {
                shard: u32_at(body, 4),
                node_id: u64_at(body, 8),
                position: u64_at(body, 16),
                last_record,
            }
        }
        KIND_PLAN => {
            exact("plan", PLAN_LEN)?;
            let value = u64_at(body, 1);
            let plan = match body[0] {
                0 => Plan::Resume(value),
                1 => Plan::Truncate(value),
                2 => Plan::Unavailable(value),
                3 => Plan::UnknownShard,
                4 => Plan::NotAReplica,
                _ => {
                    return Err(WireError::Body {
                        what: "plan",
                        reason: "unknown code",
                    });
                }
            };
            Message::Plan(plan)
        }
        KIND_DATA => {
            if body.len() < DATA_HEADER_LEN {
                return Err(WireError::Body {
                    what: "data",
                    reason: "shorter than its header",
                });
            }
            Message::Data {
                position: u64_at(body, 0),
                commit: u64_at(body, 8),
                commit_synced: u64_at(body, 16),
                records: &body[DATA_HEADER_LEN..],
            }
        }
        KIND_ACK => {
            exact("ack", ACK_LEN)?;
            Message::Ack {
                appended: u64_at(body, 0),
                synced: u64_at(body, 8),
            }
        }
        kind => return Err(WireError::Kind { kind }),
    };
    Ok(Some((message, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_reads_wait() {
        let mut out = Vec::new();
        encode_hello(&mut out, 3, 9, 4096, Some((64, 0xdead_beef)));
        encode_plan(&mut out, Plan::Truncate(7));
        encode_data(&mut out, 64, 10, 5, b"records");
        encode_ack(&mut out, 100, 90);
        encode_hello(&mut out, 1, 2, 64, None);
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some((message, used)) = decode(&out[at..]).unwrap() {
            seen.push(format!("{message:?}"));
            // Every prefix of a frame asks for more.
            for cut in 0..used {
                assert_eq!(decode(&out[at..at + cut]).unwrap(), None);
            }
            at += used;
        }
        assert_eq!(at, out.len());
        assert_eq!(
            seen,
            [
                format!(
                    "{:?}",
                    Message::Hello {
                        shard: 3,
                        node_id: 9,
                        position: 4096,
                        last_record: Some((64, 0xdead_beef))
                    }
                ),
                format!("{:?}", Message::Plan(Plan::Truncate(7))),
                format!(
                    "{:?}",
                    Message::Data {
                        position: 64,
                        commit: 10,
                        commit_synced: 5,
                        records: b"records"
                    }
                ),
                format!(
                    "{:?}",
                    Message::Ack {
                        appended: 100,
                        synced: 90
                    }
                ),
                format!(
                    "{:?}",
                    Message::Hello {
                        shard: 1,
                        node_id: 2,
                        position: 64,
                        last_record: None
                    }
                ),
            ]
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert_eq!(decode(&[0, 0, 0, 0, 1]), Err(WireError::Length { len: 0 }));
        assert_eq!(
            decode(&[2, 0, 0, 0, 9, 0]),
            Err(WireError::Kind { kind: 9 })
        );
        let mut out = Vec::new();
        encode_ack(&mut out, 1, 2);
        out[0] = 5; // a shorter ACK body
        assert!(matches!(decode(&out), Err(WireError::Body { .. })));
        let mut out = Vec::new();
        encode_hello(&mut out, 1, 1, 1, None);
        out[5] ^= 1; // magic
        assert!(matches!(decode(&out), Err(WireError::Body { .. })));
        // Any bytes: an answer, never a panic.
        let mut seed = 1u64;
        for _ in 0..10_000 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
    }
}
