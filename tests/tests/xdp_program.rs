//! The XDP program on synthetic packets (BPF_PROG_TEST_RUN): every verdict
//! and every counter, IPv4 and IPv6. Needs root (skips loudly otherwise).
//! The redirect verdict needs a real AF_XDP socket in the XSKMAP and is
//! checked in `xdp_backend.rs`.

mod xdp_support;

use kaelix_ebpf::{Counter, XdpProgram, action};
use kaelix_protocol::HEADER_LEN;
use xdp_support::{data_datagram, producer_v4, producer_v6, require_root, udp_frame};

const DATA_PORT: u16 = 7000;

/// Run `frame` once; check the verdict and that `counter`, and no other, moved by one.
fn expect(program: &XdpProgram, what: &str, frame: &[u8], want: u32, counter: Counter) {
    let before = program.counters().unwrap();
    let got = program.test_run(frame, None).expect("BPF_PROG_TEST_RUN");
    let delta = program.counters().unwrap().since(&before);
    assert_eq!(got, want, "{what}: verdict (counters moved: {delta})");
    for other in Counter::ALL {
        let moved = u64::from(other == counter);
        assert_eq!(
            delta.get(other),
            moved,
            "{what}: counter {} ({delta})",
            other.name()
        );
    }
}

#[test]
fn xdp_program_verdicts_on_synthetic_packets() {
    if !require_root("xdp_program_verdicts_on_synthetic_packets") {
        return;
    }
    let program = XdpProgram::load(DATA_PORT).expect("loading the XDP program");
    assert_eq!(program.data_port(), DATA_PORT);
    let good = data_datagram(1, 9, 1, 3, 24);

    for (family, producer) in [("IPv4", producer_v4()), ("IPv6", producer_v6())] {
        let what = |case: &str| format!("{family} {case}");
        // Valid, but no socket in the XSKMAP: back to the kernel.
        expect(
            &program,
            &what("valid"),
            &udp_frame(&producer, &good),
            action::PASS,
            Counter::PassedNoSocket,
        );
        // Another UDP port: untouched.
        let other_port = kaelix_dataplane::LinkPeer {
            remote_port: 53,
            ..producer
        };
        expect(
            &program,
            &what("other port"),
            &udp_frame(&other_port, &good),
            action::PASS,
            Counter::PassedOther,
        );
        // Data port, malformed.
        expect(
            &program,
            &what("short"),
            &udp_frame(&producer, &good[..HEADER_LEN - 1]),
            action::DROP,
            Counter::DroppedShort,
        );
        expect(
            &program,
            &what("empty"),
            &udp_frame(&producer, &[]),
            action::DROP,
            Counter::DroppedShort,
        );
        let mut bad_magic = good.clone();
        bad_magic[0] = b'Q';
        expect(
            &program,
            &what("bad magic"),
            &udp_frame(&producer, &bad_magic),
            action::DROP,
            Counter::DroppedBadMagic,
        );
        let mut bad_version = good.clone();
        bad_version[2] = 2;
        expect(
            &program,
            &what("bad version"),
            &udp_frame(&producer, &bad_version),
            action::DROP,
            Counter::DroppedBadVersion,
        );
        // First frame claims more payload than the datagram holds.
        let mut too_long = data_datagram(1, 9, 1, 1, 24);
        too_long[8..12].copy_from_slice(&25u32.to_le_bytes());
        expect(
            &program,
            &what("first frame too long"),
            &udp_frame(&producer, &too_long),
            action::DROP,
            Counter::DroppedBadLength,
        );
        // UDP length field beyond the packet.
        let mut frame = udp_frame(&producer, &good);
        let udp_at = frame.len() - good.len() - 8;
        frame[udp_at + 4..udp_at + 6].copy_from_slice(&u16::MAX.to_be_bytes());
        expect(
            &program,
            &what("UDP length too large"),
            &frame,
            action::DROP,
            Counter::DroppedBadLength,
        );
        // Truncated in the middle of the IP header: not recognisably ours.
        let frame = udp_frame(&producer, &good);
        expect(
            &program,
            &what("truncated IP header"),
            &frame[..24],
            action::PASS,
            Counter::PassedOther,
        );
    }

    let v4 = udp_frame(&producer_v4(), &good);
    // Garbage frames, never our data, never a crash.
    expect(
        &program,
        "Ethernet header only",
        &v4[..14],
        action::PASS,
        Counter::PassedOther,
    );
    let mut arp = v4.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    expect(&program, "ARP", &arp, action::PASS, Counter::PassedOther);
    let mut tcp = v4.clone();
    tcp[14 + 9] = 6;
    expect(&program, "TCP", &tcp, action::PASS, Counter::PassedOther);
    let mut icmp = v4.clone();
    icmp[14 + 9] = 1;
    expect(&program, "ICMP", &icmp, action::PASS, Counter::PassedOther);
    let mut fragment = v4.clone();
    fragment[14 + 6] = 0x20; // more fragments
    expect(
        &program,
        "IPv4 first fragment",
        &fragment,
        action::PASS,
        Counter::PassedFragment,
    );
    let mut later_fragment = v4.clone();
    later_fragment[14 + 6..14 + 8].copy_from_slice(&0x0010u16.to_be_bytes());
    expect(
        &program,
        "IPv4 later fragment",
        &later_fragment,
        action::PASS,
        Counter::PassedFragment,
    );
    // A VLAN tag in front of a valid datagram: left to the kernel.
    let mut tagged = v4[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    tagged.extend_from_slice(&v4[12..]);
    expect(
        &program,
        "VLAN-tagged",
        &tagged,
        action::PASS,
        Counter::PassedOther,
    );
    // IPv6 with an extension header (hop-by-hop) before UDP.
    let mut v6_ext = udp_frame(&producer_v6(), &good);
    v6_ext[14 + 6] = 0;
    expect(
        &program,
        "IPv6 extension header",
        &v6_ext,
        action::PASS,
        Counter::PassedOther,
    );

    // A different data port is honoured.
    let other = XdpProgram::load(7100).expect("loading a second program");
    let to_7100 = udp_frame(
        &kaelix_dataplane::LinkPeer {
            remote_port: 7100,
            ..producer_v4()
        },
        &good,
    );
    expect(
        &other,
        "data port 7100",
        &to_7100,
        action::PASS,
        Counter::PassedNoSocket,
    );
    expect(
        &other,
        "7000 on a 7100 program",
        &v4,
        action::PASS,
        Counter::PassedOther,
    );
}

#[test]
fn xdp_program_counters_add_up_over_many_runs() {
    if !require_root("xdp_program_counters_add_up_over_many_runs") {
        return;
    }
    let program = XdpProgram::load(DATA_PORT).expect("loading the XDP program");
    let good = udp_frame(&producer_v4(), &data_datagram(2, 3, 10, 1, 8));
    let mut bad = good.clone();
    let len = bad.len();
    bad[len - HEADER_LEN - 8] = 0; // first magic byte of the frame
    for _ in 0..100 {
        assert_eq!(program.test_run(&good, None).unwrap(), action::PASS);
    }
    for _ in 0..40 {
        assert_eq!(program.test_run(&bad, None).unwrap(), action::DROP);
    }
    let counters = program.counters().unwrap();
    assert_eq!(counters.get(Counter::PassedNoSocket), 100);
    assert_eq!(counters.get(Counter::DroppedBadMagic), 40);
    assert_eq!(counters.passed(), 100);
    assert_eq!(counters.dropped(), 40);
    assert_eq!(counters.get(Counter::Redirected), 0);
}
