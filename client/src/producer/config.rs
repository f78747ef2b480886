//! Producer settings and their validation.

use std::time::Duration;

use kaelix_protocol::{HEADER_LEN, MAX_DATAGRAM_LEN, MAX_PAYLOAD_LEN};

/// Datagram size that fits a 1500-byte MTU (1500 - 20 IPv4 - 8 UDP).
pub const DATAGRAM_LEN_DEFAULT: usize = 1472;

/// Settings of a producer. `Default` gives values that suit a LAN or loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerConfig {
    /// Producer id stamped on every frame. Two live producers must not share
    /// one; the default is random. Reusing an id after a restart is safe
    /// once the previous producer's frames were all acknowledged (`flush`).
    pub producer_id: u32,
    /// Largest datagram sent, bytes (default 1472; up to 65507 on loopback).
    /// A message's payload may be at most this minus 80 bytes: its 40-byte
    /// header and room for a HEARTBEAT that may have to lead it.
    pub datagram_len_max: usize,
    /// Most frames packed into one datagram.
    pub batch_frames_max: usize,
    /// How long a new message may wait for others to share its datagram.
    /// Zero sends as soon as the driver gets to it.
    pub linger: Duration,
    /// Bound on buffered bytes (payloads plus headers) not yet acknowledged.
    /// `send` blocks or fails with `BufferFull` beyond it.
    pub buffer_bytes_max: usize,
    /// Bound on buffered messages not yet acknowledged.
    pub buffer_frames_max: usize,
    /// Retransmission timeout before any round trip was measured.
    pub retransmit_timeout_initial: Duration,
    /// Floor of the measured retransmission timeout.
    pub retransmit_timeout_min: Duration,
    /// Ceiling of the retransmission timeout after backoff.
    pub retransmit_timeout_max: Duration,
    /// Silence after which a producer with unacknowledged frames sends a HEARTBEAT.
    pub heartbeat_interval: Duration,
    /// Congestion window at the start of a flow, in frames. It doubles every
    /// round trip until the first loss, then grows by one frame per round
    /// trip; a loss halves it (a timeout drops it to the minimum). Frames in
    /// flight stay within both this window and the broker's credit.
    pub congestion_window_initial: usize,
    /// Smallest congestion window, in frames.
    pub congestion_window_min: usize,
    /// With several bootstrap brokers: retransmission timeouts in a row,
    /// with no reply from a shard's destination, after which the shard
    /// moves to the next broker. 1 leaves a dead leader soonest; a false
    /// alarm (a leader slow to acknowledge) then costs a rotation and a
    /// redirect back, which 3 (the default) makes rarer on loaded machines.
    pub rotate_after_timeouts: u32,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            producer_id: random_producer_id(),
            datagram_len_max: DATAGRAM_LEN_DEFAULT,
            batch_frames_max: 256,
            linger: Duration::from_micros(200),
            buffer_bytes_max: 16 * 1024 * 1024,
            buffer_frames_max: 65_536,
            retransmit_timeout_initial: Duration::from_millis(50),
            retransmit_timeout_min: Duration::from_millis(5),
            retransmit_timeout_max: Duration::from_secs(1),
            heartbeat_interval: Duration::from_millis(100),
            congestion_window_initial: 64,
            congestion_window_min: 8,
            rotate_after_timeouts: 3,
        }
    }
}

/// A setting out of its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("producer setting {key} = {value} is out of range (allowed: {allowed})")]
pub struct ConfigError {
    /// The setting's name.
    pub key: &'static str,
    /// The value given.
    pub value: String,
    /// The allowed range.
    pub allowed: &'static str,
}

impl ProducerConfig {
    /// Largest payload one message may carry with these settings.
    pub fn payload_len_max(&self) -> usize {
        (self.datagram_len_max.saturating_sub(2 * HEADER_LEN)).min(MAX_PAYLOAD_LEN)
    }

    /// Check every setting; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(
            ok: bool,
            key: &'static str,
            value: impl std::fmt::Debug,
            allowed: &'static str,
        ) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError {
                    key,
                    value: format!("{value:?}"),
                    allowed,
                })
            }
        }
        check(
            (2 * HEADER_LEN..=MAX_DATAGRAM_LEN).contains(&self.datagram_len_max),
            "datagram_len_max",
            self.datagram_len_max,
            "80..=65507",
        )?;
        check(
            self.batch_frames_max >= 1,
            "batch_frames_max",
            self.batch_frames_max,
            ">= 1",
        )?;
        check(
            self.buffer_frames_max >= 1,
            "buffer_frames_max",
            self.buffer_frames_max,
            ">= 1",
        )?;
        check(
            self.buffer_bytes_max >= self.datagram_len_max,
            "buffer_bytes_max",
            self.buffer_bytes_max,
            ">= datagram_len_max",
        )?;
        check(
            !self.retransmit_timeout_min.is_zero()
                && self.retransmit_timeout_min <= self.retransmit_timeout_initial
                && self.retransmit_timeout_initial <= self.retransmit_timeout_max,
            "retransmit_timeout_initial",
            (
                self.retransmit_timeout_min,
                self.retransmit_timeout_initial,
                self.retransmit_timeout_max,
            ),
            "0 < min <= initial <= max",
        )?;
        check(
            self.congestion_window_min >= 1
                && self.congestion_window_min <= self.congestion_window_initial,
            "congestion_window_min",
            (self.congestion_window_min, self.congestion_window_initial),
            "1 <= min <= initial",
        )?;
        check(
            self.rotate_after_timeouts >= 1,
            "rotate_after_timeouts",
            self.rotate_after_timeouts,
            ">= 1",
        )?;
        check(
            !self.heartbeat_interval.is_zero(),
            "heartbeat_interval",
            self.heartbeat_interval,
            "> 0",
        )
    }
}

/// A random non-zero producer id (std's randomly seeded hasher; no extra crate).
pub fn random_producer_id() -> u32 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    (hasher.finish() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ids_differ() {
        let config = ProducerConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.payload_len_max(), 1392);
        assert_ne!(random_producer_id(), random_producer_id());
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let config = ProducerConfig {
            datagram_len_max: 70_000,
            ..ProducerConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "datagram_len_max");
        assert!(err.to_string().contains("80..=65507"));
        let config = ProducerConfig {
            retransmit_timeout_min: Duration::ZERO,
            ..ProducerConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().key,
            "retransmit_timeout_initial"
        );
        let loopback = ProducerConfig {
            datagram_len_max: MAX_DATAGRAM_LEN,
            ..ProducerConfig::default()
        };
        assert_eq!(
            loopback.payload_len_max(),
            MAX_DATAGRAM_LEN - 2 * HEADER_LEN
        );
    }
}
