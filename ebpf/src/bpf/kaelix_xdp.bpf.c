// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * kaelix_xdp: steer MemoryStreamer data-port datagrams into AF_XDP sockets.
 *
 * For every packet on the interface:
 *   Ethernet -> IPv4 or IPv6 -> UDP.
 *   - not UDP to `data_port` (ARP, ICMP, TCP, other UDP, VLAN-tagged frames,
 *     IPv6 extension headers, IPv4 fragments): XDP_PASS, untouched;
 *   - UDP to `data_port` whose UDP payload starts with a frame header carrying
 *     our magic ("KX") and version: redirected into xsks_map[rx_queue_index],
 *     or passed to the kernel when no socket is registered for that queue;
 *   - UDP to `data_port` that is malformed (truncated, bad UDP length, payload
 *     shorter than one frame header, wrong magic, wrong version, first frame
 *     longer than the datagram): XDP_DROP.
 * Every verdict increments one per-CPU counter (enum counter below; the Rust
 * loader in ../lib.rs mirrors it and must be kept in step).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define KX_MAGIC_0 'K'
#define KX_MAGIC_1 'X'
#define KX_VERSION 1
#define KX_HEADER_LEN 40
#define KX_MAX_QUEUES 64
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* Counter slots. Keep in step with `Counter` in ebpf/src/lib.rs. */
enum counter {
	CNT_REDIRECTED = 0,      /* handed to the AF_XDP socket of the rx queue */
	CNT_PASSED_OTHER,        /* not for the data port: left to the kernel */
	CNT_PASSED_NO_SOCKET,    /* data port, valid, but no socket on this queue */
	CNT_PASSED_FRAGMENT,     /* IPv4 fragment: the kernel reassembles it */
	CNT_DROPPED_SHORT,       /* data port, truncated header or payload < 40 bytes */
	CNT_DROPPED_BAD_MAGIC,   /* data port, first frame magic is not "KX" */
	CNT_DROPPED_BAD_VERSION, /* data port, first frame version is not 1 */
	CNT_DROPPED_BAD_LENGTH,  /* data port, UDP length or first frame length inconsistent */
	CNT_MAX,
};

struct counters {
	__u64 count[CNT_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, KX_MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

/* UDP destination port of the data plane, host byte order; set by the loader. */
const volatile __u16 data_port = 7000;

static __always_inline int count(enum counter reason, int verdict)
{
	__u32 key = 0;
	struct counters *c = bpf_map_lookup_elem(&counters, &key);

	if (c && reason < CNT_MAX)
		c->count[reason] += 1;
	return verdict;
}

SEC("xdp")
int kaelix_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp;
	__u16 proto;
	void *l3;

	if ((void *)(eth + 1) > data_end)
		return count(CNT_PASSED_OTHER, XDP_PASS);
	proto = eth->h_proto;
	l3 = eth + 1;

	/*
	 * VLAN-tagged frames (0x8100, 0x88a8) fall through to XDP_PASS below: the
	 * AF_XDP reply path carries no VLAN tag, so tagged traffic stays with the
	 * kernel stack.
	 */
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;
		__u32 ihl;

		if ((void *)(ip + 1) > data_end)
			return count(CNT_PASSED_OTHER, XDP_PASS);
		if (ip->protocol != IPPROTO_UDP)
			return count(CNT_PASSED_OTHER, XDP_PASS);
		ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return count(CNT_PASSED_OTHER, XDP_PASS);
		if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
			return count(CNT_PASSED_FRAGMENT, XDP_PASS);
		udp = l3 + ihl;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;

		if ((void *)(ip6 + 1) > data_end)
			return count(CNT_PASSED_OTHER, XDP_PASS);
		/* Extension headers (fragments included) go to the kernel. */
		if (ip6->nexthdr != IPPROTO_UDP)
			return count(CNT_PASSED_OTHER, XDP_PASS);
		udp = (void *)(ip6 + 1);
	} else {
		return count(CNT_PASSED_OTHER, XDP_PASS);
	}

	if ((void *)(udp + 1) > data_end)
		return count(CNT_PASSED_OTHER, XDP_PASS);
	if (udp->dest != bpf_htons(data_port))
		return count(CNT_PASSED_OTHER, XDP_PASS);

	/* From here on the packet is for the data plane: malformed means dropped. */
	__u8 *frame = (void *)(udp + 1);
	__u32 udp_len = bpf_ntohs(udp->len);
	__u32 available = (__u32)(data_end - (void *)udp);

	if (udp_len < sizeof(*udp) || udp_len > available)
		return count(CNT_DROPPED_BAD_LENGTH, XDP_DROP);
	if ((void *)(frame + KX_HEADER_LEN) > data_end ||
	    udp_len < sizeof(*udp) + KX_HEADER_LEN)
		return count(CNT_DROPPED_SHORT, XDP_DROP);
	if (frame[0] != KX_MAGIC_0 || frame[1] != KX_MAGIC_1)
		return count(CNT_DROPPED_BAD_MAGIC, XDP_DROP);
	if (frame[2] != KX_VERSION)
		return count(CNT_DROPPED_BAD_VERSION, XDP_DROP);

	/* payload_len, little-endian u32 at offset 8 of the frame header. */
	__u32 payload_len = (__u32)frame[8] | ((__u32)frame[9] << 8) |
			    ((__u32)frame[10] << 16) | ((__u32)frame[11] << 24);
	if (payload_len > udp_len - sizeof(*udp) - KX_HEADER_LEN)
		return count(CNT_DROPPED_BAD_LENGTH, XDP_DROP);

	if (bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS) == XDP_REDIRECT)
		return count(CNT_REDIRECTED, XDP_REDIRECT);
	return count(CNT_PASSED_NO_SOCKET, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
