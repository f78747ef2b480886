//! Where each shard's frames go in a cluster: a per-shard destination that
//! follows `not_leader` redirects and rotates through the bootstrap brokers
//! when a destination is silent or knows no leader.
//!
//! A stream belongs to shard `stream % shards`; every broker serves shard
//! `s` at its data address's port plus `s` ([`shard_destination`]). The
//! producer starts each shard at the first broker. Moving a shard to
//! another address (a redirect or a rotation) counts a *move*; the first
//! move since the destination last acknowledged something goes at once
//! when a leader was named, every other move waits a backoff (doubling per
//! move, [`ROUTE_BACKOFF_MIN`] to [`ROUTE_BACKOFF_MAX`]) and then probes the
//! new destination with a HEARTBEAT before any DATA, so a cluster without a
//! leader gets a few heartbeats rather than whole windows.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Backoff of the second move in a row without an acknowledgement.
pub const ROUTE_BACKOFF_MIN: Duration = Duration::from_millis(2);
/// Ceiling of the backoff between moves.
pub const ROUTE_BACKOFF_MAX: Duration = Duration::from_millis(25);
/// Most brokers a producer rotates through: the bootstrap list plus the
/// leaders redirects named that it did not hold.
const BROKERS_LEARNED_MAX: usize = 64;

/// The data address of the shard owning `stream_id` on a broker whose
/// shard 0 listens at `broker` and whose `shards` shards listen on
/// consecutive ports (shard `stream_id % shards`).
pub fn shard_destination(broker: SocketAddr, shards: u16, stream_id: u32) -> SocketAddr {
    let mut addr = broker;
    if shards > 1 {
        let shard = (stream_id % u32::from(shards)) as u16;
        addr.set_port(addr.port().wrapping_add(shard));
    }
    addr
}

/// Why a set of routes could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No broker address was given.
    #[error("no broker address: a producer needs at least one")]
    NoBrokers,
    /// A broker's shards would not fit its port range.
    #[error("broker {broker} with {shards} shards: ports beyond 65535")]
    PortRange {
        /// The broker's base data address.
        broker: SocketAddr,
        /// Shards per broker.
        shards: u16,
    },
}

/// One shard's destination and its failover state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShardRoute {
    /// Where the shard's frames go now.
    pub addr: SocketAddr,
    /// Where they went before the last move: replies from there are stale.
    pub previous: Option<SocketAddr>,
    /// Index in the bootstrap list of the last broker rotated to.
    pub broker: usize,
    /// Redirects and rotations since the destination last acknowledged.
    pub moves: u32,
    /// Retransmission timeouts of the shard's flows since the destination
    /// last answered anything.
    pub silent_timeouts: u32,
    /// Nothing goes to the shard before this (a backoff after a move).
    pub hold_until: Option<Instant>,
}

/// The destinations of a producer's shards: the bootstrap brokers, the
/// shard count, and one [`ShardRoute`] per shard.
#[derive(Debug, Clone)]
pub struct Routes {
    brokers: Vec<SocketAddr>,
    shards: u16,
    routes: Vec<ShardRoute>,
}

impl Routes {
    /// Routes over `brokers` (base data addresses of the cluster's brokers,
    /// duplicates ignored), each running `shards` shards (0 counts as 1).
    /// Every shard starts at the first broker.
    pub fn new(brokers: &[SocketAddr], shards: u16) -> Result<Self, RouteError> {
        let shards = shards.max(1);
        let mut list: Vec<SocketAddr> = Vec::with_capacity(brokers.len());
        for &broker in brokers {
            if u32::from(broker.port()) + u32::from(shards) - 1 > u32::from(u16::MAX) {
                return Err(RouteError::PortRange { broker, shards });
            }
            if !list.contains(&broker) {
                list.push(broker);
            }
        }
        let first = *list.first().ok_or(RouteError::NoBrokers)?;
        let routes = (0..shards)
            .map(|shard| ShardRoute {
                addr: shard_destination(first, shards, u32::from(shard)),
                previous: None,
                broker: 0,
                moves: 0,
                silent_timeouts: 0,
                hold_until: None,
            })
            .collect();
        Ok(Self {
            brokers: list,
            shards,
            routes,
        })
    }

    /// The bootstrap brokers (base data addresses), duplicates removed.
    pub fn brokers(&self) -> &[SocketAddr] {
        &self.brokers
    }

    /// Shards per broker.
    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// The shard of `stream_id`.
    pub fn shard_of(&self, stream_id: u32) -> usize {
        (stream_id % u32::from(self.shards)) as usize
    }

    /// Where frames of `stream_id` go now.
    pub fn destination(&self, stream_id: u32) -> SocketAddr {
        self.routes[self.shard_of(stream_id)].addr
    }

    pub(crate) fn route(&self, shard: usize) -> &ShardRoute {
        &self.routes[shard]
    }

    pub(crate) fn route_mut(&mut self, shard: usize) -> &mut ShardRoute {
        &mut self.routes[shard]
    }

    /// Whether a reply about `shard` from `from` is from its current
    /// destination. Only the address it moved away from last counts as
    /// another: a broker bound to a wildcard address may answer from
    /// another local address than the one it was sent to.
    pub(crate) fn is_current(&self, shard: usize, from: SocketAddr) -> bool {
        let route = &self.routes[shard];
        from == route.addr || Some(from) != route.previous
    }

    /// The backoff before the `moves`-th move in a row (none for the first).
    fn backoff(moves: u32) -> Duration {
        match moves {
            0 => Duration::ZERO,
            n => ROUTE_BACKOFF_MIN
                .saturating_mul(1 << (n - 1).min(16))
                .min(ROUTE_BACKOFF_MAX),
        }
    }

    /// Send `shard` to `leader` (named by a `not_leader` hint). Returns the
    /// hold (if any) the move waits for, or `None` as the outer value when
    /// the shard already goes there (a stale reply).
    pub(crate) fn redirect(
        &mut self,
        shard: usize,
        leader: SocketAddr,
        now: Instant,
    ) -> Option<Option<Instant>> {
        if self.routes[shard].addr == leader {
            return None;
        }
        // Rotation goes on from the broker whose shard address this is; a
        // broker the list does not name yet (it moved, or was never given)
        // joins the list, so that later rotations can find it again.
        let shards = self.shards;
        let known = self
            .brokers
            .iter()
            .position(|&broker| shard_destination(broker, shards, shard as u32) == leader);
        let index = known.or_else(|| {
            let offset = if shards > 1 { shard as u16 } else { 0 };
            let port = leader.port().checked_sub(offset)?;
            if self.brokers.len() >= BROKERS_LEARNED_MAX
                || u32::from(port) + u32::from(shards) - 1 > u32::from(u16::MAX)
            {
                return None;
            }
            self.brokers.push(SocketAddr::new(leader.ip(), port));
            Some(self.brokers.len() - 1)
        });
        let route = &mut self.routes[shard];
        route.previous = Some(route.addr);
        route.addr = leader;
        if let Some(index) = index {
            route.broker = index;
        }
        Some(Self::moved(route, now))
    }

    /// Send `shard` to the next bootstrap broker. Returns the hold the move
    /// waits for.
    pub(crate) fn rotate(&mut self, shard: usize, now: Instant) -> Option<Instant> {
        let next = (self.routes[shard].broker + 1) % self.brokers.len();
        let addr = shard_destination(self.brokers[next], self.shards, shard as u32);
        let route = &mut self.routes[shard];
        route.broker = next;
        if route.addr != addr {
            route.previous = Some(route.addr);
        }
        route.addr = addr;
        // A rotation always probes first: nobody said a leader is there.
        route.moves = route.moves.max(1);
        Self::moved(route, now)
    }

    fn moved(route: &mut ShardRoute, now: Instant) -> Option<Instant> {
        let backoff = Self::backoff(route.moves);
        route.moves = route.moves.saturating_add(1);
        route.silent_timeouts = 0;
        route.hold_until = (!backoff.is_zero()).then_some(now + backoff);
        route.hold_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn shards_map_to_ports_and_rotation_wraps() {
        let brokers = [addr("127.0.0.1:7100"), addr("127.0.0.2:7200")];
        let mut routes = Routes::new(&brokers, 4).unwrap();
        assert_eq!(routes.destination(6), addr("127.0.0.1:7102"));
        let now = Instant::now();
        let hold = routes.rotate(2, now);
        assert_eq!(routes.destination(6), addr("127.0.0.2:7202"));
        assert_eq!(hold, Some(now + ROUTE_BACKOFF_MIN));
        let hold = routes.rotate(2, now);
        assert_eq!(routes.destination(6), addr("127.0.0.1:7102"));
        assert_eq!(hold, Some(now + ROUTE_BACKOFF_MIN * 2));
        // Other shards did not move.
        assert_eq!(routes.destination(5), addr("127.0.0.1:7101"));
    }

    #[test]
    fn first_redirect_goes_at_once_and_a_stale_one_is_ignored() {
        let brokers = [addr("127.0.0.1:7100"), addr("127.0.0.2:7200")];
        let mut routes = Routes::new(&brokers, 2).unwrap();
        let now = Instant::now();
        assert_eq!(routes.redirect(1, addr("127.0.0.2:7201"), now), Some(None));
        assert_eq!(routes.route(1).broker, 1, "found in the bootstrap list");
        assert_eq!(routes.redirect(1, addr("127.0.0.2:7201"), now), None);
        // A second move without an acknowledgement waits.
        assert_eq!(
            routes.redirect(1, addr("127.0.0.9:7201"), now),
            Some(Some(now + ROUTE_BACKOFF_MIN))
        );
        for _ in 0..20 {
            routes.rotate(1, now);
        }
        assert_eq!(routes.route(1).hold_until, Some(now + ROUTE_BACKOFF_MAX));
    }

    #[test]
    fn a_leader_named_by_a_redirect_joins_the_rotation() {
        // One broker given; the leader of shard 1 lives elsewhere.
        let mut routes = Routes::new(&[addr("127.0.0.1:7100")], 2).unwrap();
        let now = Instant::now();
        routes.redirect(1, addr("127.0.0.7:7301"), now);
        assert_eq!(
            routes.brokers(),
            &[addr("127.0.0.1:7100"), addr("127.0.0.7:7300")],
            "its base address (shard 1 is port + 1) was learned"
        );
        assert_eq!(routes.route(1).broker, 1);
        // Rotating goes round both; shard 0 finds the learned broker too.
        routes.rotate(1, now);
        assert_eq!(routes.destination(1), addr("127.0.0.1:7101"));
        routes.rotate(1, now);
        assert_eq!(routes.destination(1), addr("127.0.0.7:7301"));
        routes.rotate(0, now);
        assert_eq!(routes.destination(0), addr("127.0.0.7:7300"));
        // Known ones are not added twice.
        routes.redirect(0, addr("127.0.0.1:7100"), now);
        assert_eq!(routes.brokers().len(), 2);
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(Routes::new(&[], 1).unwrap_err(), RouteError::NoBrokers);
        assert!(matches!(
            Routes::new(&[addr("127.0.0.1:65535")], 2),
            Err(RouteError::PortRange { shards: 2, .. })
        ));
        let routes = Routes::new(&[addr("127.0.0.1:1"), addr("127.0.0.1:1")], 0).unwrap();
        assert_eq!(routes.brokers().len(), 1);
        assert_eq!(routes.shards(), 1);
    }
}
