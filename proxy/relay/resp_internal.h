/* What the parts of the RESP framer share (resp_framer.h is its face to the engine).
 *
 *   resp_scan.c     framing: the Scanner (where a frame ends) and the reading of a
 *                   whole frame's elements, as far as matching needs them
 *   resp_match.c    matching: the Conversation (which command a reply answers), its
 *                   queues of command runs and pub/sub channel sets
 *   resp_request.c  the client side: the RequestParser, which notes each command
 *   resp_framer.c   the reply driver (rf_reply): what goes on as read, what is held
 *                   whole, the -MOVED/-ASK rewrite, what Python is asked about
 *
 * The helpers the per-reply path runs (q_head, q_pop, scan_idle) are static inline
 * here, so that path keeps them inlined across the files. Not for the engine. */
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

/* -- resp_scan.c ------------------------------------------------------------------- */

/* int(bytes) as Python reads it; 0, or -1 for a ValueError. */
int rf_pyint(const char *s, size_t n, int64_t *out);
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

uint64_t rf_q_total(const rf_queue_t *q);
void rf_q_clear(rf_queue_t *q);
void rf_set_clear(rf_set_t *s);

/* The id (N_*) of a command name; N_OTHER for any other. */
int rf_name_id(const char *a, size_t n);
/* CAPTURE_FOR: the commands whose arguments matching looks at. */
static inline int captured_name(int id) { return id != N_OTHER; }

/* Conversation.request: a command, its name and first two arguments in f->rq_args. */
void rf_conv_request(rf_t *f, int nargs, uint32_t argc, int inl);
/* Conversation.reply of one whole frame (resp_match.c says what it sets); -1 where
 * parse() would have failed. */
int rf_conv_reply(rf_t *f, const char *raw, size_t n, int *cmd_rw, int *exec, size_t *nspec);
/* Whether the reply starting with type byte t must be seen whole to be matched. */
int rf_needs_whole(rf_t *f, int t);
/* The head command's reply went by unread. */
void rf_consume(rf_t *f);

#endif
