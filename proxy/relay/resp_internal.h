/* What the parts of the RESP framer share (resp_framer.h is its face to the engine).
 *
 *   resp_scan.c     framing: the Scanner (where a frame ends) and the reading of a
 *                   whole frame's elements, as far as matching needs them
 *   resp_match.c    a whole reply: the Conversation's reply side (which command it
 *                   answers; queues of command runs, pub/sub channel sets) and what
 *                   becomes of it: the -MOVED/-ASK rewrite, or Python asked
 *   resp_request.c  the client side: the RequestParser, and the Conversation's request
 *                   side, which notes each command in the pending queue
 *   resp_framer.c   the reply driver (rf_reply): the node's stream in chunks, what goes
 *                   on as read, what is held till it is whole
 *
 * What runs per command or per reply and is needed by more than one file (pyint,
 * q_head, q_push, q_pop, needs_whole, consume, scan_idle) is static inline here: the
 * split costs those paths no calls they did not make in one file (measured with
 * _engine.Framer on pipelined chunks). Not for the engine. */
#ifndef CACHEPORT_RESP_INTERNAL_H
#define CACHEPORT_RESP_INTERNAL_H

#include "resp_framer.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

/* The kind of a pending command: what matching does with its reply. */
enum { PLAIN = 0, WATCHED, K_MULTI, K_EXEC, K_DISCARD, K_HELLO, K_RESET, K_SUB, K_OPAQUE };
/* Names that matter (ids); 0 is any other. */
enum { N_OTHER = 0, N_CLUSTER, N_CLIENT, N_MULTI, N_EXEC, N_DISCARD, N_HELLO, N_RESET,
       N_SUBSCRIBE, N_PSUBSCRIBE, N_SSUBSCRIBE, N_UNSUBSCRIBE, N_PUNSUBSCRIBE,
       N_SUNSUBSCRIBE, N_MONITOR, N_SYNC, N_PSYNC };

static inline int lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

static inline int ieq(const char *a, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (n != m)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (lower((unsigned char)a[i]) != lit[i])
            return 0;
    return 1;
}

/* -- lengths, on both sides ---------------------------------------------------------- */

#define SAT (1LL << 60)

static inline int py_space(int c) { return c == ' ' || (c >= 9 && c <= 13); }

/* int(bytes) as Python reads it (whitespace around it, a sign, '_' between digits);
 * saturates far beyond any length that matters. 0, or -1 for a ValueError. */
static inline int pyint(const char *s, size_t n, int64_t *out) {
    size_t i = 0;
    while (i < n && py_space((unsigned char)s[i]))
        i++;
    while (n > i && py_space((unsigned char)s[n - 1]))
        n--;
    if (i >= n)
        return -1;
    int neg = 0;
    if (s[i] == '+' || s[i] == '-') {
        neg = s[i] == '-';
        i++;
    }
    if (i >= n || s[i] < '0' || s[i] > '9')
        return -1;
    int64_t v = 0;
    int us = 0;
    for (; i < n; i++) {
        char c = s[i];
        if (c == '_') {
            if (us)
                return -1;
            us = 1;
            continue;
        }
        if (c < '0' || c > '9')
            return -1;
        us = 0;
        if (v < SAT)
            v = v * 10 + (c - '0');
        if (v > SAT)
            v = SAT;
    }
    if (us)
        return -1;
    *out = neg ? -v : v;
    return 0;
}

/* -- resp_scan.c ------------------------------------------------------------------- */

/* Make *buf hold need bytes (doubling from 64); -1 out of memory. */
int rf_grow(char **buf, uint32_t *cap, size_t need);

static inline int scan_idle(const rf_scan_t *s) {
    return !(s->depth || s->skip || s->linelen || s->stream);
}

/* Offset just past the first top-level frame completing in d[pos:n]; -1 when d ends
 * first (all consumed into the state); -2 for a broken stream. */
ssize_t rf_scan(rf_scan_t *s, const char *d, size_t n, size_t pos);

/* An element of a whole frame (frames.py parse, as far as matching needs). */
typedef struct {
    int kind;            /* type byte of the value (after any attribute) */
    int isbytes;         /* the value is a byte string (Python: isinstance(value, bytes)) */
    const char *v;       /* its bytes, when not streamed */
    size_t vlen;
    uint64_t hash;       /* of its bytes (streamed strings too) */
    char head[RF_ARG];   /* its first bytes, lower-cased */
    size_t end;          /* offset past the element */
} rf_elem_t;

/* The header of the aggregate a whole frame is (after any attribute). */
typedef struct {
    int kind;
    int64_t count;       /* elements; -1 for a null aggregate */
    size_t first;        /* offset of the first element */
    int streamed;
} rf_agg_t;

/* One element at d[pos:n] of a whole frame; -1 where parse() would fail. */
int rf_read_elem(const char *d, size_t n, size_t pos, rf_elem_t *e);
/* The aggregate header of the whole frame raw[0:n]; -1 where parse() would fail. */
int rf_read_agg(const char *raw, size_t n, rf_agg_t *a);
/* Element i of an aggregate; -1 if absent or unreadable. */
int rf_nth(const char *raw, size_t n, const rf_agg_t *a, int64_t i, rf_elem_t *out);

/* -- resp_match.c ------------------------------------------------------------------ */

static inline rf_cmd_t *q_head(rf_queue_t *q) { return q->len ? &q->v[q->head] : NULL; }

static inline void q_pop(rf_queue_t *q) {
    rf_cmd_t *h = &q->v[q->head];
    if (--h->count)
        return;
    q->head = (q->head + 1) & (q->cap - 1);
    if (--q->len == 0)
        q->head = 0;  /* the buffer stays: a request at a time allocates nothing */
}

/* Room for one more run (doubling from 4); -1 out of memory. */
int rf_q_grow(rf_queue_t *q);

static inline int q_push(rf_queue_t *q, const rf_cmd_t *c) {
    if (q->len) {
        rf_cmd_t *last = &q->v[(q->head + q->len - 1) & (q->cap - 1)];
        if (last->kind == c->kind && last->id == c->id && last->sub == c->sub &&
                last->argc == c->argc && last->count < UINT32_MAX) {
            last->count++;
            return 0;
        }
    }
    if (q->len == q->cap && rf_q_grow(q) < 0)
        return -1;
    rf_cmd_t *slot = &q->v[(q->head + q->len) & (q->cap - 1)];
    *slot = *c;
    slot->count = 1;
    q->len++;
    return 0;
}

uint64_t rf_q_total(const rf_queue_t *q);
void rf_q_clear(rf_queue_t *q);
void rf_set_clear(rf_set_t *s);

/* _on_frame: a whole reply frame raw[0:n], matched; RF_DONE (unchanged), RF_EMIT
 * (rewritten into f->out), RF_ASK (Python rewrites it), RF_ERROR. */
int rf_on_frame(rf_t *f, const char *raw, size_t n, rf_out_t *o);
void rf_end_multi(rf_t *f);  /* MULTI's queue is over: EXEC, DISCARD */

/* An EXEC's queued commands include one whose result must be seen whole. */
static inline int queued_needs_whole(const rf_t *f) {
    const rf_queue_t *q = &f->queued;
    for (uint32_t i = 0; i < q->len; i++) {
        int k = q->v[(q->head + i) & (q->cap - 1)].kind;
        if (k == WATCHED || k == K_HELLO)
            return 1;
    }
    return 0;
}

/* Whether the reply starting with type byte t must be seen whole to be matched (a
 * plain reply to a plain command is not: it goes by unread). */
static inline int needs_whole(rf_t *f, int t) {
    rf_cmd_t *h = q_head(&f->pending);
    if (t == '-' || t == '>' || t == '|' || t == '!' || h == NULL)
        return 1;
    if (h->kind == PLAIN)
        return f->special;
    if (h->kind == K_EXEC)
        return queued_needs_whole(f);
    return 1;
}

/* The head command's reply went by unread. */
static inline void consume(rf_t *f) {
    int kind = f->pending.v[f->pending.head].kind;
    q_pop(&f->pending);
    if (kind == K_EXEC)
        rf_end_multi(f);
}

#endif
