/* See kx_dpdk_shim.h. Each function is a one-line forward to DPDK's inline. */
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#include "kx_dpdk_shim.h"

int kx_dpdk_errno(void) { return rte_errno; }

unsigned int kx_dpdk_lcore_id(void) { return rte_lcore_id(); }

uint16_t kx_dpdk_rx_burst(uint16_t port_id, uint16_t queue_id,
                          struct rte_mbuf **rx_pkts, uint16_t nb_pkts)
{
    return rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
}

uint16_t kx_dpdk_tx_burst(uint16_t port_id, uint16_t queue_id,
                          struct rte_mbuf **tx_pkts, uint16_t nb_pkts)
{
    return rte_eth_tx_burst(port_id, queue_id, tx_pkts, nb_pkts);
}

struct rte_mbuf *kx_dpdk_pktmbuf_alloc(struct rte_mempool *pool)
{
    return rte_pktmbuf_alloc(pool);
}

int kx_dpdk_pktmbuf_alloc_bulk(struct rte_mempool *pool, struct rte_mbuf **mbufs,
                               unsigned int count)
{
    return rte_pktmbuf_alloc_bulk(pool, mbufs, count);
}

void kx_dpdk_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

void *kx_dpdk_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }

uint16_t kx_dpdk_pktmbuf_data_len(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }

uint32_t kx_dpdk_pktmbuf_pkt_len(const struct rte_mbuf *m) { return rte_pktmbuf_pkt_len(m); }

uint16_t kx_dpdk_pktmbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }

char *kx_dpdk_pktmbuf_append(struct rte_mbuf *m, uint16_t len)
{
    return rte_pktmbuf_append(m, len);
}

int kx_dpdk_pktmbuf_trim(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_trim(m, len); }

uint16_t kx_dpdk_pktmbuf_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }

