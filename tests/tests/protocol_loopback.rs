//! A datagram of frames survives a real UDP loopback round trip.

use std::net::UdpSocket;
use std::time::Duration;

use kaelix_protocol::{Datagram, DatagramBuilder, MAX_DATAGRAM_LEN};

#[test]
fn datagram_round_trips_over_loopback_udp() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut builder = DatagramBuilder::new(&mut buf);
    for seq in 1..=100u64 {
        builder
            .push_data(5, 6, seq, seq * 10, &seq.to_le_bytes())
            .unwrap();
    }
    tx.send_to(builder.as_bytes(), rx.local_addr().unwrap())
        .unwrap();
    let mut recv = vec![0u8; MAX_DATAGRAM_LEN];
    let (len, _) = rx.recv_from(&mut recv).unwrap();
    let seqs: Vec<u64> = Datagram::new(&recv[..len])
        .frames()
        .map(|f| f.unwrap().sequence())
        .collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
}
