/* The node map (nodemap.h): a small table, scanned linearly -- a cluster has tens of
 * nodes, and only a redirect looks. */
#include "nodemap.h"

#include <stdlib.h>
#include <string.h>

nodemap_t *nm_new(void) {
    nodemap_t *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return NULL;
    pthread_mutex_init(&m->lock, NULL);
    m->refs = 1;
    return m;
}

void nm_ref(nodemap_t *m) { __atomic_add_fetch(&m->refs, 1, __ATOMIC_RELAXED); }

void nm_unref(nodemap_t *m) {
    if (m == NULL || __atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    pthread_mutex_destroy(&m->lock);
    free(m->e);
    free(m->text);
    free(m);
}

int nm_swap(nodemap_t *m, size_t n, const char *const *hosts, const size_t *hlens,
            const unsigned *ports, const char *const *outs, const size_t *olens) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += hlens[i] + olens[i];
    nm_entry_t *e = calloc(n ? n : 1, sizeof(*e));
    char *text = malloc(total ? total : 1);
    if (e == NULL || text == NULL) {
        free(e);
        free(text);
        return -1;
    }
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        e[i].host = (uint32_t)at;
        e[i].hlen = (uint32_t)hlens[i];
        memcpy(text + at, hosts[i], hlens[i]);
        at += hlens[i];
        e[i].out = (uint32_t)at;
        e[i].olen = (uint32_t)olens[i];
        memcpy(text + at, outs[i], olens[i]);
        at += olens[i];
        e[i].port = ports[i];
    }
    pthread_mutex_lock(&m->lock);
    nm_entry_t *old_e = m->e;
    char *old_text = m->text;
    m->e = e;
    m->text = text;
    m->n = n;
    pthread_mutex_unlock(&m->lock);
    free(old_e);
    free(old_text);
    return 0;
}

int nm_lookup(void *ctx, const char *host, size_t hlen, unsigned port, char *out, size_t cap) {
    nodemap_t *m = ctx;
    int r = -1;
    pthread_mutex_lock(&m->lock);
    for (size_t i = 0; i < m->n; i++) {
        nm_entry_t *e = &m->e[i];
        if (e->port == port && e->hlen == hlen && memcmp(m->text + e->host, host, hlen) == 0) {
            if (e->olen <= cap) {
                memcpy(out, m->text + e->out, e->olen);
                r = (int)e->olen;
            }
            break;
        }
    }
    pthread_mutex_unlock(&m->lock);
    return r;
}

size_t nm_size(nodemap_t *m) {
    pthread_mutex_lock(&m->lock);
    size_t n = m->n;
    pthread_mutex_unlock(&m->lock);
    return n;
}
