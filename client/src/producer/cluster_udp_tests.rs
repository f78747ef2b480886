//! The UDP [`Producer`] against model brokers on loopback sockets playing
//! a cluster's leader, followers and dead brokers (one shared model: the
//! replicated log). No timing is asserted: waits are generous bounds.

use std::time::Duration;

use super::driver::Producer;
use crate::testing::{Faults, ModelBroker, Role, UdpModelBroker};

const PRODUCER_ID: u32 = 4242;
const WAIT: Duration = Duration::from_secs(30);

fn leader() -> UdpModelBroker {
    let mut model = ModelBroker::new(1024);
    model.add_stream(1);
    model.add_stream(2);
    UdpModelBroker::spawn(model, Faults::default()).expect("leader socket")
}

fn payload(i: usize) -> Vec<u8> {
    format!("message {i:05}").into_bytes()
}

/// The model holds exactly `count` records of `stream`, in send order.
fn assert_stored_once_in_order(broker: &UdpModelBroker, stream: u32, count: usize) {
    let model = broker.model();
    let stored: Vec<Vec<u8>> = model
        .records(stream)
        .iter()
        .map(|record| record.payload.clone())
        .collect();
    let expected: Vec<Vec<u8>> = (0..count).map(payload).collect();
    assert_eq!(stored, expected, "stream {stream}");
}

#[test]
fn producer_follows_the_hint_of_a_follower_to_the_leader() {
    let leader = leader();
    let follower = leader
        .replica(Role::Following(Some(leader.addr())))
        .unwrap();
    let producer = Producer::builder(follower.addr())
        .brokers([leader.addr()])
        .producer_id(PRODUCER_ID)
        .connect()
        .unwrap();
    for i in 0..199 {
        producer.send(1, &payload(i)).unwrap();
    }
    let delivery = producer.send_and_wait(1, &payload(199), WAIT).unwrap();
    assert_eq!(delivery.offset, Some(199));
    producer.flush(WAIT).unwrap();
    assert!(producer.take_errors().is_empty());
    assert_stored_once_in_order(&leader, 1, 200);
    let stats = producer.stats();
    assert_eq!((stats.redirects, stats.rotations), (1, 0), "{stats:?}");
    assert_eq!(producer.destination(1), leader.addr());
}

#[test]
fn producer_leaves_a_silent_broker_for_the_next_one() {
    let leader = leader();
    let dead = leader.replica(Role::Silent).unwrap();
    let producer = Producer::builder(dead.addr())
        .brokers([leader.addr()])
        .producer_id(PRODUCER_ID)
        .connect()
        .unwrap();
    let delivery = producer.send_and_wait(1, &payload(0), WAIT).unwrap();
    assert_eq!(delivery.offset, Some(0));
    assert!(dead.datagrams_received() >= 1, "the first broker was tried");
    let stats = producer.stats();
    assert!(stats.rotations >= 1, "{stats:?}");
    assert_eq!(producer.destination(1), leader.addr());
}

#[test]
fn producer_fails_over_mid_stream_without_loss_or_duplicates() {
    let first = leader();
    let second = first.replica(Role::Following(Some(first.addr()))).unwrap();
    let third = first.replica(Role::Following(Some(first.addr()))).unwrap();
    let producer = Producer::builder(first.addr())
        .brokers([second.addr(), third.addr()])
        .producer_id(PRODUCER_ID)
        .connect()
        .unwrap();
    for i in 0..300 {
        producer.send(1, &payload(i)).unwrap();
        producer.send(2, &payload(i)).unwrap();
    }
    // The leader dies with messages in flight; an election follows (no
    // leader known), then the third broker leads and the second names it.
    first.set_role(Role::Silent);
    second.set_role(Role::Following(None));
    third.set_role(Role::Following(None));
    for i in 300..600 {
        producer.send(1, &payload(i)).unwrap();
        producer.send(2, &payload(i)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    third.set_role(Role::Leading);
    second.set_role(Role::Following(Some(third.addr())));
    for i in 600..1000 {
        producer.send(1, &payload(i)).unwrap();
        producer.send(2, &payload(i)).unwrap();
    }
    producer.flush(WAIT).unwrap();
    assert!(producer.take_errors().is_empty());
    assert_stored_once_in_order(&first, 1, 1000);
    assert_stored_once_in_order(&first, 2, 1000);
    assert_eq!(producer.destination(1), third.addr());
    let stats = producer.stats();
    assert_eq!(stats.messages_acked, 2000, "{stats:?}");
}
