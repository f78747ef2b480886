//! # kaelix-client: the MemoryStreamer producer and consumers
//!
//! What applications link to write to and read from a MemoryStreamer broker.
//!
//! - [`Producer`]: sends messages over UDP in batched datagrams, numbers them
//!   per `(producer, stream)` flow, keeps what is unacknowledged in a bounded
//!   buffer, retransmits on timeout and on duplicate ACKs (go-back-N),
//!   respects the broker's credit window and reports ERROR frames.
//!   Fire-and-forget ([`Producer::send`] + [`Producer::flush`]) or
//!   send-and-wait ([`Producer::send_and_wait`], which returns the stream
//!   offset). Its logic lives in the sans-IO [`ProducerState`], which takes
//!   time and bytes in and gives datagrams and events out, so it is tested
//!   without sockets; [`Producer`] drives it with one background thread and
//!   a `std::net::UdpSocket`.
//!
//! - [`Consumer`]: reads one stream by offset, either remotely over the
//!   broker's TCP fetch protocol ([`Consumer::remote`]) or locally by
//!   mapping the broker's log read-only ([`Consumer::local`], no round trip
//!   and no copy). [`Consumer::poll`] returns records borrowed from the
//!   consumer, each frame's CRC checked; seek by offset; long-poll when
//!   caught up (follow mode).
//!
//! What it leaves out on purpose: async runtimes (the producer is a small
//! blocking driver; an async application can run the sans-IO core itself),
//! compression and schemas (payloads are opaque bytes).
//!
//! The feature `testing` adds [`testing`]: a reference model of the broker's
//! produce side, also served over loopback UDP with injected faults.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod consumer;
pub mod producer;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use consumer::{ConsumeError, Consumer, ConsumerConfig, Record, Records, StartOffset};
pub use producer::{
    Delivery, FailedMessage, FlowAck, ProduceError, Producer, ProducerBuilder, ProducerConfig,
    ProducerEvent, ProducerState, ProducerStats, RouteError, Routes, SendError, Ticket,
};
