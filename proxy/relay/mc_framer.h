/* The Memcached framer of a cluster's configuration-endpoint connection (mc_framer.c):
 * the same rf_t and rf_request/rf_reply face as the RESP framer, chosen by rf_t.mc.
 *
 *   client bytes --mc_request--> only the binary protocol noted (bytes go on unchanged)
 *   node bytes   --mc_reply----> forward n bytes | emit a held line | ask Python about
 *                                one whole auto-discovery unit | close
 *
 * A C port of proxy/protocols/memcache AutoDiscoveryRewriter.feed_reply: reply lines are
 * framed, a data block (after VALUE, VA and CONFIG lines) is skipped by its length, and
 * only a ``CONFIG cluster`` or ``VALUE AmazonElastiCache:cluster`` unit (line, block,
 * CRLF) is handed whole to Python's rewriter (RF_ASK_MC), which is the reference
 * (tests/test_mc_framer_fuzz.py compares the two on random streams). */
#ifndef CACHEPORT_MC_FRAMER_H
#define CACHEPORT_MC_FRAMER_H

#include "resp_framer.h"

#define MC_MAX_LINE (1 << 20)  /* proxy/protocols/memcache MAX_LINE */

void mc_request(rf_t *f, const char *p, size_t n);
size_t mc_reply(rf_t *f, const char *p, size_t n, rf_out_t *o, int *action);
int mc_idle(const rf_t *f);

#endif
