/* The node map of one cluster: internal host:port -> "announce:port", as the last
 * topology refresh left it (a Memcached cluster's stays empty: it only says the
 * protocol, since its one rewrite, the auto-discovery reply, is Python's). Python swaps the whole table (nm_swap); the engine thread
 * looks a redirect's target up (nm_lookup, an rf_lookup_fn) under the map's own lock,
 * which only a redirect and a swap ever take. Connections hold a reference. */
#ifndef CACHEPORT_NODEMAP_H
#define CACHEPORT_NODEMAP_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t host, hlen, out, olen;  /* offsets into the table's text */
    unsigned port;
} nm_entry_t;

typedef struct {
    pthread_mutex_t lock;
    int refs;                        /* atomic */
    nm_entry_t *e;
    size_t n;
    char *text;
    uint8_t mc;                      /* a Memcached cluster's: its connections frame that */
} nodemap_t;

nodemap_t *nm_new(void);
void nm_ref(nodemap_t *m);
void nm_unref(nodemap_t *m);
/* Replace the table: n entries, each host (hlen), port, out (olen). 0, or -1 (ENOMEM). */
int nm_swap(nodemap_t *m, size_t n, const char *const *hosts, const size_t *hlens,
            const unsigned *ports, const char *const *outs, const size_t *olens);
int nm_lookup(void *m, const char *host, size_t hlen, unsigned port, char *out, size_t cap);
size_t nm_size(nodemap_t *m);

#endif
