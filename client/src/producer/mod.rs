//! The producer: a sans-IO core ([`ProducerState`]) and a UDP driver
//! ([`Producer`]) that runs it on a background thread.

mod config;
mod driver;
mod route;
mod state;

pub use config::{ConfigError, DATAGRAM_LEN_DEFAULT, ProducerConfig, random_producer_id};
pub use driver::{FailedMessage, ProduceError, Producer, ProducerBuilder};
pub use route::{ROUTE_BACKOFF_MAX, ROUTE_BACKOFF_MIN, RouteError, Routes, shard_destination};
pub use state::{
    Delivery, FlowAck, ProducerEvent, ProducerState, ProducerStats, SendError, Ticket, Transmit,
    is_permanent,
};

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod cluster_udp_tests;
#[cfg(test)]
mod state_tests;
