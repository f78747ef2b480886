//! A broker restarted on the same data directory keeps what it acknowledged
//! at `flush`/`fsync` and recognises retransmits of it as duplicates.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use kaelix_controlplane::broker::Broker;
use kaelix_controlplane::config::{Config, StreamSection};
use kaelix_protocol::{Datagram, DatagramBuilder, DurabilityLevel, FrameKind, MAX_DATAGRAM_LEN};

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.broker.data_dir = Some(dir.to_path_buf());
    config.broker.data_addr = "127.0.0.1:0".parse().unwrap();
    config.streams = vec![
        StreamSection {
            id: 2,
            durability: DurabilityLevel::Flush,
        },
        StreamSection {
            id: 3,
            durability: DurabilityLevel::Fsync,
        },
    ];
    config
}

/// Send frames `seqs` of `stream` in one datagram; return the ACK's (sequence, last_offset).
fn produce(broker: SocketAddr, stream: u32, seqs: std::ops::RangeInclusive<u64>) -> (u64, u64) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut builder = DatagramBuilder::new(&mut buf);
    for seq in seqs.clone() {
        builder
            .push_data(stream, 42, seq, seq, format!("message {seq}").as_bytes())
            .unwrap();
    }
    socket.send_to(builder.as_bytes(), broker).unwrap();
    let mut reply = vec![0u8; 2048];
    loop {
        let n = socket.recv(&mut reply).expect("an ACK within 5 s");
        for frame in Datagram::new(&reply[..n]).frames() {
            let frame = frame.unwrap();
            assert_eq!(frame.kind(), FrameKind::Ack, "{frame:?}");
            let ack = frame.ack().unwrap();
            if frame.sequence() == *seqs.end() {
                return (frame.sequence(), ack.last_offset.get());
            }
        }
    }
}

#[test]
fn acknowledged_data_survives_restart_and_retransmits_are_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let broker = Broker::start(&config).unwrap();
    let addr = broker.shards()[0].data_addr;
    assert_eq!(produce(addr, 2, 1..=5), (5, 4));
    assert_eq!(produce(addr, 3, 1..=3), (3, 2));
    broker.shutdown().unwrap();

    let broker = Broker::start(&config).unwrap();
    let addr = broker.shards()[0].data_addr;
    // Retransmits of acknowledged frames: acknowledged again, not appended again.
    assert_eq!(produce(addr, 2, 1..=5), (5, 4));
    assert_eq!(produce(addr, 3, 2..=3), (3, 2));
    // New frames continue the stream's offsets.
    assert_eq!(produce(addr, 2, 6..=7), (7, 6));
    let shard = &broker.shards()[0];
    let mut reader = shard.reader.clone();
    let payloads: Vec<String> = reader
        .read(2, 0, 1 << 20, u64::MAX)
        .unwrap()
        .map(|record| {
            let record = record.unwrap();
            let frame = kaelix_protocol::Frame::parse(record.bytes).unwrap();
            String::from_utf8(frame.payload().to_vec()).unwrap()
        })
        .collect();
    assert_eq!(
        payloads,
        (1..=7).map(|i| format!("message {i}")).collect::<Vec<_>>()
    );
    broker.shutdown().unwrap();
}
