//! Planned leadership transfer (`kaelix cluster transfer`) on three `kaelix
//! serve` processes with data replication (clusters from
//! `failover_support`, default timings: nothing moves unless asked).
//!
//! A producer that knows all three brokers sends at a steady rate while the
//! shard's leadership is moved twice: to a named follower, then to the one
//! the leader picks. Each transfer must name the new leader and epoch, the
//! new leader must take writes, and every acknowledged message is read back
//! once, in order, from the last leader. Refusals (a node outside the
//! replica set, the current leader, an unknown shard) leave the leader in
//! place. Timings are printed, not asserted (performance is measured in
//! benchmarks: `benches/scripts/cluster.sh`, part `transfer`).

use std::net::SocketAddr;
use std::time::Duration;

use kaelix_client::producer::Producer;
use kaelix_tests::kaelix_bin;

mod failover_support;
use failover_support::*;

#[test]
fn planned_transfers_move_the_lead_without_losing_or_doubling_anything() {
    let bin = kaelix_bin();
    let runtime = runtime();
    let dirs = node_dirs(3);
    let nodes = cluster(&bin, &dirs, DEFAULTS);
    let brokers: Vec<SocketAddr> = nodes.iter().map(|n| n.data).collect();
    let producer = Producer::builder(brokers[0])
        .brokers(brokers.clone())
        .connect()
        .expect("a producer");
    let mut load = Load::after_first_ack(&producer);
    // Both followers connected (a transfer needs its target following).
    load.until("settle", Duration::from_secs(60), || {
        nodes
            .iter()
            .all(|n| shard0(&runtime, n).is_some_and(|p| p.epoch == 1 && p.appended > 0))
    });

    let first = leader_of_shard0(&runtime, &nodes).expect("a shard leader");
    let target = (first + 1) % nodes.len();
    for _ in 0..200 {
        load.send("before");
    }

    // Refusals leave everything in place.
    let admin = nodes[target].admin.clone();
    let err = kaelix_fails(
        &bin,
        &[
            "cluster", "transfer", "--shard", "0", "--to", "9", "--admin", &admin,
        ],
    );
    assert!(err.contains("holds no replica"), "{err}");
    let leader_id = nodes[first].id.to_string();
    let err = kaelix_fails(
        &bin,
        &[
            "cluster", "transfer", "--shard", "0", "--to", &leader_id, "--admin", &admin,
        ],
    );
    assert!(err.contains("leads it already"), "{err}");
    let err = kaelix_fails(
        &bin,
        &["cluster", "transfer", "--shard", "7", "--admin", &admin],
    );
    assert!(err.contains("shard 7 has no replica set"), "{err}");
    assert_eq!(leader_of_shard0(&runtime, &nodes), Some(first));

    // To a named follower, asked of that follower (it forwards to the
    // leader), while the producer keeps sending.
    let to = nodes[target].id.to_string();
    let transfer = kaelix_in_background(
        &bin,
        &[
            "cluster", "transfer", "--shard", "0", "--to", &to, "--admin", &admin,
        ],
    );
    while !transfer.is_finished() {
        load.send("during the first transfer");
    }
    transfer.join().expect("the first transfer succeeded");
    load.until("after the first transfer", Duration::from_secs(30), || {
        leader_of_shard0(&runtime, &nodes) == Some(target)
    });
    let after_first = shard0(&runtime, &nodes[target]).expect("the new leader answers");
    assert_eq!(after_first.epoch, 2, "a transfer starts the next epoch");

    // To whichever follower goes furthest, asked of the new leader, with
    // the report as JSON.
    let report = kaelix_ok(
        &bin,
        &[
            "cluster",
            "transfer",
            "--shard",
            "0",
            "--json",
            "--admin",
            &nodes[target].admin,
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&report).expect("a JSON report");
    eprintln!("second transfer: {report}");
    assert_eq!(report["from"], nodes[target].id);
    assert_eq!(report["epoch"], 3);
    assert_ne!(report["to"], nodes[target].id);
    let second = nodes
        .iter()
        .position(|n| report["to"] == n.id)
        .expect("the report names a node");
    load.until("after the second transfer", Duration::from_secs(30), || {
        leader_of_shard0(&runtime, &nodes) == Some(second)
    });
    for _ in 0..200 {
        load.send("after");
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("every message acknowledged");
    eprintln!("producer: {:?}", producer.stats());
    assert!(producer.take_errors().is_empty(), "no message failed");
    assert_eq!(
        leader_of_shard0(&runtime, &nodes),
        Some(second),
        "nothing moved the lead unasked"
    );
    assert_read_back(nodes[second].fetch, producer.producer_id(), &load.sent);
}
