/*
 * Out-of-line wrappers for DPDK's `static inline` fast-path functions and
 * macros, which bindgen cannot bind. Compiled by build.rs with the cflags of
 * libdpdk.pc, so the inlined code matches the installed DPDK exactly.
 *
 * `struct rte_mbuf` stays opaque on the Rust side: every field access goes
 * through a function here, so the Rust code never depends on its layout.
 */
#ifndef KX_DPDK_SHIM_H
#define KX_DPDK_SHIM_H

#include <stdint.h>

struct rte_mbuf;
struct rte_mempool;

/* rte_errno of the calling thread (a per-lcore TLS variable behind a macro). */
int kx_dpdk_errno(void);

/* rte_lcore_id() of the calling thread (LCORE_ID_ANY when not registered). */
unsigned int kx_dpdk_lcore_id(void);

/* rte_eth_rx_burst / rte_eth_tx_burst. */
uint16_t kx_dpdk_rx_burst(uint16_t port_id, uint16_t queue_id,
                          struct rte_mbuf **rx_pkts, uint16_t nb_pkts);
uint16_t kx_dpdk_tx_burst(uint16_t port_id, uint16_t queue_id,
                          struct rte_mbuf **tx_pkts, uint16_t nb_pkts);

/* rte_pktmbuf_alloc / rte_pktmbuf_alloc_bulk (0 on success) / rte_pktmbuf_free. */
struct rte_mbuf *kx_dpdk_pktmbuf_alloc(struct rte_mempool *pool);
int kx_dpdk_pktmbuf_alloc_bulk(struct rte_mempool *pool, struct rte_mbuf **mbufs,
                               unsigned int count);
void kx_dpdk_pktmbuf_free(struct rte_mbuf *m);

/* rte_pktmbuf_mtod(m, void *): start of the data of the first segment. */
void *kx_dpdk_pktmbuf_mtod(struct rte_mbuf *m);
/* rte_pktmbuf_data_len (first segment) and rte_pktmbuf_pkt_len (all segments). */
uint16_t kx_dpdk_pktmbuf_data_len(const struct rte_mbuf *m);
uint32_t kx_dpdk_pktmbuf_pkt_len(const struct rte_mbuf *m);
/* Number of segments of the packet. */
uint16_t kx_dpdk_pktmbuf_nb_segs(const struct rte_mbuf *m);
/* rte_pktmbuf_append: NULL when the last segment has not `len` bytes of tailroom. */
char *kx_dpdk_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
/* rte_pktmbuf_trim: 0 on success, -1 when `len` exceeds the last segment. */
int kx_dpdk_pktmbuf_trim(struct rte_mbuf *m, uint16_t len);
/* rte_pktmbuf_tailroom. */
uint16_t kx_dpdk_pktmbuf_tailroom(const struct rte_mbuf *m);

#endif /* KX_DPDK_SHIM_H */
