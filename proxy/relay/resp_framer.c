/* The RESP framer of a Redis Cluster connection (resp_framer.h says what it owns).
 *
 * Each part follows its Python original line by line, so that the two give the same
 * output for any byte stream (tests/test_framer_fuzz.py): the scanner is
 * proxy/protocols/resp/framing.py's Scanner, the request side requests.py's
 * RequestParser (both its whole-command fast path and its byte-by-byte path, with
 * their length parsing, which is Python's int()), the matching matching.py's
 * Conversation, and rf_reply the driver of redis_cluster/rewrite.py's
 * ClusterRewriter.feed_reply. Pending commands are kept as runs, so a long pipeline
 * of plain commands takes one entry. Allocation happens only for what is rare: a
 * header line cut by a chunk, a frame that must be seen whole, nesting, pub/sub. */
#include "resp_framer.h"

#include "mc_framer.h"

#include <stdlib.h>
#include <string.h>

#define SAT (1LL << 60)

enum { PLAIN = 0, WATCHED, K_MULTI, K_EXEC, K_DISCARD, K_HELLO, K_RESET, K_SUB, K_OPAQUE };
/* Names that matter (ids); 0 is any other. */
enum { N_OTHER = 0, N_CLUSTER, N_CLIENT, N_MULTI, N_EXEC, N_DISCARD, N_HELLO, N_RESET,
       N_SUBSCRIBE, N_PSUBSCRIBE, N_SSUBSCRIBE, N_UNSUBSCRIBE, N_PUNSUBSCRIBE,
       N_SUNSUBSCRIBE, N_MONITOR, N_SYNC, N_PSYNC };
static const char *NAMES[] = {"", "cluster", "client", "multi", "exec", "discard", "hello",
                              "reset", "subscribe", "psubscribe", "ssubscribe", "unsubscribe",
                              "punsubscribe", "sunsubscribe", "monitor", "sync", "psync"};
#define NNAMES (sizeof(NAMES) / sizeof(NAMES[0]))

static int lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

static int ieq(const char *a, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (n != m)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (lower((unsigned char)a[i]) != lit[i])
            return 0;
    return 1;
}

static int name_id(const char *a, size_t n) {
    if (n < 4 || n > 12)
        return N_OTHER;  /* GET, SET, ...: the common case, decided by the length */
    for (size_t k = 1; k < NNAMES; k++)
        if (ieq(a, n, NAMES[k]))
            return (int)k;
    return N_OTHER;
}

static int kind_of_name(int id) {
    switch (id) {
    case N_CLUSTER: return WATCHED;
    case N_MULTI: return K_MULTI;
    case N_EXEC: return K_EXEC;
    case N_DISCARD: return K_DISCARD;
    case N_HELLO: return K_HELLO;
    case N_RESET: return K_RESET;
    case N_SUBSCRIBE: case N_PSUBSCRIBE: case N_SSUBSCRIBE:
    case N_UNSUBSCRIBE: case N_PUNSUBSCRIBE: case N_SUNSUBSCRIBE: return K_SUB;
    case N_MONITOR: case N_SYNC: case N_PSYNC: return K_OPAQUE;
    default: return PLAIN;
    }
}

/* CAPTURE_FOR: the commands whose arguments matching looks at. */
static int captured_name(int id) { return id != N_OTHER; }

static int py_space(int c) { return c == ' ' || (c >= 9 && c <= 13); }

/* int(bytes) as Python reads it (whitespace around it, a sign, '_' between digits);
 * saturates far beyond any length that matters. 0, or -1 for a ValueError. */
static int pyint(const char *s, size_t n, int64_t *out) {
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

static int grow(char **buf, uint32_t *cap, size_t need) {
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    char *b = realloc(*buf, c);
    if (b == NULL)
        return -1;
    *buf = b;
    *cap = (uint32_t)c;
    return 0;
}

/* -- the scanner (framing.py Scanner) ------------------------------------------- */

static int push(rf_scan_t *s, int64_t v) {
    if (s->depth >= RF_MAX_DEPTH)
        return -1;
    if (s->depth == s->cap) {
        uint32_t c = s->cap ? s->cap * 2 : 8;
        int64_t *st = realloc(s->stack, c * sizeof(*st));
        if (st == NULL)
            return -1;
        s->stack = st;
        s->cap = c;
    }
    s->stack[s->depth++] = v;
    return 0;
}

static int scan_idle(const rf_scan_t *s) {
    return !(s->depth || s->skip || s->linelen || s->stream);
}

/* Offset just past the first top-level frame completing in d[pos:n]; -1 when d ends
 * first (all consumed into the state); -2 for a broken stream. */
static ssize_t scan(rf_scan_t *s, const char *d, size_t n, size_t pos) {
    for (;;) {
        if (s->skip) {
            int64_t skip = s->skip;
            int64_t avail = (int64_t)(n - pos);
            if (skip > avail) {
                int64_t rest = skip - avail;
                if (rest == 1 && avail && d[n - 1] != '\r')
                    return -2;
                s->skip = rest;
                return -1;
            }
            size_t end = pos + (size_t)skip;
            if ((skip >= 2 && d[end - 2] != '\r') || d[end - 1] != '\n')
                return -2;
            s->skip = 0;
            pos = end;
            if (s->stream)
                continue;
        } else {
            if (pos >= n)
                return -1;
            const char *nlp = memchr(d + pos, '\n', n - pos);
            const char *h;
            size_t hl;
            if (s->linelen) {
                if (nlp == NULL) {
                    if (s->linelen + (n - pos) > RF_MAX_LINE)
                        return -2;
                    if (grow(&s->line, &s->linecap, s->linelen + (n - pos)) < 0)
                        return -2;
                    memcpy(s->line + s->linelen, d + pos, n - pos);
                    s->linelen += (uint32_t)(n - pos);
                    return -1;
                }
                size_t take = (size_t)(nlp - d) + 1 - pos;
                if (grow(&s->line, &s->linecap, s->linelen + take) < 0)
                    return -2;
                memcpy(s->line + s->linelen, d + pos, take);
                size_t full = s->linelen + take;
                s->linelen = 0;
                pos += take;
                if (full < 3 || s->line[full - 2] != '\r')
                    return -2;
                h = s->line;
                hl = full - 2;
            } else {
                if (nlp == NULL) {
                    if (n - pos > RF_MAX_LINE)
                        return -2;
                    if (grow(&s->line, &s->linecap, n - pos) < 0)
                        return -2;
                    memcpy(s->line, d + pos, n - pos);
                    s->linelen = (uint32_t)(n - pos);
                    return -1;
                }
                size_t nl = (size_t)(nlp - d);
                if (nl - pos < 2 || d[nl - 1] != '\r')
                    return -2;
                h = d + pos;
                hl = nl - 1 - pos;
                pos = nl + 1;
            }
            int t = (unsigned char)h[0];
            int64_t v;
            if (s->stream && t != ';')
                return -2;
            if (t == '$' || t == '=' || t == '!') {
                if (t == '$' && hl == 2 && h[1] == '?') {
                    s->stream = 1;
                    continue;
                }
                if (pyint(h + 1, hl - 1, &v) < 0)
                    return -2;
                if (v < 0) {
                    if (v != -1 || t != '$')
                        return -2;
                } else {
                    if (v + 2 > (int64_t)(n - pos)) {
                        s->skip = v + 2;
                        continue;
                    }
                    size_t end = pos + (size_t)v + 2;
                    if (d[end - 2] != '\r' || d[end - 1] != '\n')
                        return -2;
                    pos = end;
                }
            } else if (t == '+' || t == '-' || t == ':' || t == '_' || t == ',' || t == '#' ||
                       t == '(') {
                /* one line */
            } else if (t == '*' || t == '%' || t == '~' || t == '>' || t == '|') {
                if (hl == 2 && h[1] == '?' && t != '|') {
                    if (push(s, 0) < 0)
                        return -2;
                    continue;
                }
                if (pyint(h + 1, hl - 1, &v) < 0)
                    return -2;
                if (v > 0) {
                    if (t == '%' || t == '|')
                        v *= 2;
                    if (push(s, t == '|' ? -v : v) < 0)
                        return -2;
                    continue;
                }
                if (v < 0 && (v != -1 || t != '*'))
                    return -2;
                if (t == '|')
                    continue;
            } else if (t == ';') {
                if (!s->stream)
                    return -2;
                if (pyint(h + 1, hl - 1, &v) < 0 || v < 0)
                    return -2;
                if (v) {
                    s->skip = v + 2;
                    continue;
                }
                s->stream = 0;
            } else if (t == '.') {
                if (!s->depth || s->stack[s->depth - 1] != 0)
                    return -2;
                s->depth--;
            } else {
                return -2;
            }
        }
        /* One element is complete: close every aggregate it completes. */
        int more = 0;
        while (s->depth) {
            int64_t c = s->stack[s->depth - 1];
            if (c > 1) {
                s->stack[s->depth - 1] = c - 1;
                more = 1;
                break;
            }
            if (c == 1) {
                s->depth--;
                continue;
            }
            if (c == 0) {
                more = 1;
                break;
            }
            if (c < -1) {
                s->stack[s->depth - 1] = c + 1;
                more = 1;
                break;
            }
            s->depth--;
            more = 1;
            break;
        }
        if (!more)
            return (ssize_t)pos;
    }
}

/* -- a whole frame, read for matching (frames.py parse, as far as matching needs) -- */

typedef struct {
    int kind;            /* type byte of the value (after any attribute) */
    int isbytes;         /* the value is a byte string (Python: isinstance(value, bytes)) */
    const char *v;       /* its bytes, when not streamed */
    size_t vlen;
    uint64_t hash;       /* of its bytes (streamed strings too) */
    char head[RF_ARG];   /* its first bytes, lower-cased */
    size_t end;          /* offset past the element */
} rf_elem_t;

static uint64_t fnv(uint64_t h, const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ULL;
    }
    return h;
}
#define FNV0 14695981039346656037ULL

static void head_add(rf_elem_t *e, const char *p, size_t n) {
    for (size_t i = 0; i < n && e->vlen + i < RF_ARG; i++)
        e->head[e->vlen + i] = (char)lower((unsigned char)p[i]);
}

/* The end of the frame at d[pos:n] (an attribute runs on to the value it annotates),
 * read by a scanner of its own; -1 if it is not whole. */
static ssize_t skip_frame(const char *d, size_t n, size_t pos) {
    rf_scan_t s;
    memset(&s, 0, sizeof(s));
    ssize_t end = scan(&s, d, n, pos);
    free(s.stack);
    free(s.line);
    return end < 0 ? -1 : end;
}

/* Past an attribute header at d[pos] (its 2v elements): the offset of what it annotates. */
static ssize_t skip_attribute(const char *d, size_t n, size_t pos, size_t nl) {
    int64_t v;
    if (pyint(d + pos + 1, nl - 1 - pos - 1, &v) < 0 || v < 0)
        return -1;
    size_t p = nl + 1;
    for (int64_t k = 0; k < 2 * v; k++) {
        ssize_t end = skip_frame(d, n, p);
        if (end < 0)
            return -1;
        p = (size_t)end;
    }
    return (ssize_t)p;
}

/* One element at d[pos:n] of a frame the scanner found whole (attributes before it are
 * not elements); -1 where parse() would fail. */
static int elem(const char *d, size_t n, size_t pos, rf_elem_t *e) {
    memset(e, 0, sizeof(*e));
    e->hash = FNV0;
    for (;;) {
        const char *nlp = pos < n ? memchr(d + pos, '\n', n - pos) : NULL;
        if (nlp == NULL || (size_t)(nlp - d) - pos < 2 || nlp[-1] != '\r')
            return -1;
        size_t nl = (size_t)(nlp - d);
        const char *h = d + pos;
        size_t hl = nl - 1 - pos;
        int t = (unsigned char)h[0];
        int64_t v;
        if (t == '|') {
            ssize_t p = skip_attribute(d, n, pos, nl);
            if (p < 0)
                return -1;
            pos = (size_t)p;
            continue;
        }
        e->kind = t;
        if (t == '*' || t == '%' || t == '~' || t == '>') {
            ssize_t end = skip_frame(d, n, pos);
            if (end < 0)
                return -1;
            e->end = (size_t)end;
            return 0;
        }
        if (t == '$' || t == '=' || t == '!') {
            if (t == '$' && hl == 2 && h[1] == '?') {
                size_t p = nl + 1;
                e->isbytes = 1;
                for (;;) {
                    const char *q = p < n ? memchr(d + p, '\n', n - p) : NULL;
                    if (q == NULL || (size_t)(q - d) - p < 2 || q[-1] != '\r' || d[p] != ';')
                        return -1;
                    size_t ql = (size_t)(q - d);
                    if (pyint(d + p + 1, ql - 1 - p - 1, &v) < 0)
                        return -1;
                    p = ql + 1;
                    if (v == 0)
                        break;
                    if (v < 0 || v + 2 > (int64_t)(n - p) || d[p + v] != '\r' ||
                            d[p + v + 1] != '\n')
                        return -1;
                    head_add(e, d + p, (size_t)v);
                    e->hash = fnv(e->hash, d + p, (size_t)v);
                    e->vlen += (size_t)v;
                    p += (size_t)v + 2;
                }
                e->end = p;
                return 0;
            }
            if (pyint(h + 1, hl - 1, &v) < 0)
                return -1;
            if (v == -1 && t == '$') {
                e->end = nl + 1;
                return 0;
            }
            if (v < 0 || v + 2 > (int64_t)(n - nl - 1) || d[nl + 1 + v] != '\r' ||
                    d[nl + 2 + v] != '\n')
                return -1;
            e->isbytes = 1;
            e->v = d + nl + 1;
            head_add(e, e->v, (size_t)v);  /* at vlen, still 0 */
            e->vlen = (size_t)v;
            e->hash = fnv(FNV0, e->v, e->vlen);
            e->end = nl + 3 + (size_t)v;
            return 0;
        }
        if (t == '+' || t == '-' || t == ':' || t == ',' || t == '#' || t == '(') {
            e->isbytes = 1;
            e->v = h + 1;
            head_add(e, e->v, hl - 1);
            e->vlen = hl - 1;
            e->hash = fnv(FNV0, e->v, e->vlen);
            e->end = nl + 1;
            return 0;
        }
        if (t == '_') {
            e->end = nl + 1;
            return 0;
        }
        return -1;
    }
}

/* The header of the aggregate a whole frame is (after any attribute). */
typedef struct {
    int kind;
    int64_t count;       /* elements; -1 for a null aggregate */
    size_t first;        /* offset of the first element */
    int streamed;
} rf_agg_t;

static int agg(const char *raw, size_t n, rf_agg_t *a) {
    size_t pos = 0;
    for (;;) {
        const char *nlp = pos < n ? memchr(raw + pos, '\n', n - pos) : NULL;
        if (nlp == NULL || (size_t)(nlp - raw) - pos < 2 || nlp[-1] != '\r')
            return -1;
        size_t nl = (size_t)(nlp - raw);
        int t = (unsigned char)raw[pos];
        int64_t v;
        if (t == '|') {
            ssize_t p = skip_attribute(raw, n, pos, nl);
            if (p < 0)
                return -1;
            pos = (size_t)p;
            continue;
        }
        a->kind = t;
        a->first = nl + 1;
        a->streamed = 0;
        a->count = 0;
        if (t != '*' && t != '%' && t != '~' && t != '>')
            return 0;
        if (nl - pos == 3 && raw[pos + 1] == '?') {
            a->streamed = 1;
            return 0;
        }
        if (pyint(raw + pos + 1, nl - 1 - pos - 1, &v) < 0)
            return -1;
        a->count = v < 0 ? -1 : (t == '%' ? 2 * v : v);
        return 0;
    }
}

/* Element i of an aggregate; -1 if absent or unreadable. */
static int nth(const char *raw, size_t n, const rf_agg_t *a, int64_t i, rf_elem_t *out) {
    size_t p = a->first;
    for (int64_t k = 0;; k++) {
        if (!a->streamed && k >= a->count)
            return -1;
        if (a->streamed && p < n && raw[p] == '.')
            return -1;
        if (elem(raw, n, p, out) < 0)
            return -1;
        if (k == i)
            return 0;
        p = out->end;
    }
}

/* -- channel sets ---------------------------------------------------------------- */

static uint64_t h_nz(uint64_t h) { return h ? h : 1; }

static int set_has(const rf_set_t *s, uint64_t h) {
    if (!s->cap)
        return 0;
    h = h_nz(h);
    for (uint32_t i = (uint32_t)(h & (s->cap - 1));; i = (i + 1) & (s->cap - 1)) {
        if (s->v[i] == 0)
            return 0;
        if (s->v[i] == h)
            return 1;
    }
}

static void set_add(rf_set_t *s, uint64_t h) {
    if (set_has(s, h))
        return;
    if ((s->n + 1) * 2 > s->cap) {
        uint32_t c = s->cap ? s->cap * 2 : 16;
        uint64_t *v = calloc(c, sizeof(*v));
        if (v == NULL)
            return;
        for (uint32_t i = 0; i < s->cap; i++) {
            if (s->v[i]) {
                uint32_t j = (uint32_t)(s->v[i] & (c - 1));
                while (v[j])
                    j = (j + 1) & (c - 1);
                v[j] = s->v[i];
            }
        }
        free(s->v);
        s->v = v;
        s->cap = c;
    }
    h = h_nz(h);
    uint32_t i = (uint32_t)(h & (s->cap - 1));
    while (s->v[i])
        i = (i + 1) & (s->cap - 1);
    s->v[i] = h;
    s->n++;
}

static void set_del(rf_set_t *s, uint64_t h) {
    if (!s->cap)
        return;
    h = h_nz(h);
    uint32_t m = s->cap - 1, i = (uint32_t)(h & m);
    for (;; i = (i + 1) & m) {
        if (s->v[i] == 0)
            return;
        if (s->v[i] == h)
            break;
    }
    s->v[i] = 0;
    s->n--;
    /* backward-shift the cluster after it */
    for (uint32_t j = (i + 1) & m; s->v[j]; j = (j + 1) & m) {
        uint32_t home = (uint32_t)(s->v[j] & m);
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            s->v[i] = s->v[j];
            s->v[j] = 0;
            i = j;
        }
    }
}

static void set_clear(rf_set_t *s) {
    free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}

/* -- queues of command runs ------------------------------------------------------- */

static rf_cmd_t *q_head(rf_queue_t *q) { return q->len ? &q->v[q->head] : NULL; }

static int q_push(rf_queue_t *q, const rf_cmd_t *c) {
    if (q->len) {
        rf_cmd_t *last = &q->v[(q->head + q->len - 1) & (q->cap - 1)];
        if (last->kind == c->kind && last->id == c->id && last->sub == c->sub &&
                last->argc == c->argc && last->count < UINT32_MAX) {
            last->count++;
            return 0;
        }
    }
    if (q->len == q->cap) {
        uint32_t cap = q->cap ? q->cap * 2 : 4;
        rf_cmd_t *v = malloc(cap * sizeof(*v));
        if (v == NULL)
            return -1;
        for (uint32_t i = 0; i < q->len; i++)
            v[i] = q->v[(q->head + i) & (q->cap - 1)];
        free(q->v);
        q->v = v;
        q->cap = cap;
        q->head = 0;
    }
    rf_cmd_t *slot = &q->v[(q->head + q->len) & (q->cap - 1)];
    *slot = *c;
    slot->count = 1;
    q->len++;
    return 0;
}

static void q_pop(rf_queue_t *q) {
    rf_cmd_t *h = &q->v[q->head];
    if (--h->count)
        return;
    q->head = (q->head + 1) & (q->cap - 1);
    if (--q->len == 0)
        q->head = 0;  /* the buffer stays: a request at a time allocates nothing */
}

static uint64_t q_total(const rf_queue_t *q) {
    uint64_t t = 0;
    for (uint32_t i = 0; i < q->len; i++)
        t += q->v[(q->head + i) & (q->cap - 1)].count;
    return t;
}

static void q_clear(rf_queue_t *q) {
    free(q->v);
    q->v = NULL;
    q->len = q->cap = q->head = 0;
}

/* -- matching (matching.py Conversation) ----------------------------------------- */

static int subscribed(const rf_t *f) { return f->subs[0].n || f->subs[1].n || f->subs[2].n; }

static void update_special(rf_t *f) {
    f->special = f->in_multi || (f->protocol == 2 && subscribed(f));
}

static int rw_of(const char *a, size_t n) {
    if (ieq(a, n, "slots")) return RW_SLOTS;
    if (ieq(a, n, "shards")) return RW_SHARDS;
    if (ieq(a, n, "nodes")) return RW_NODES;
    if (ieq(a, n, "replicas") || ieq(a, n, "slaves")) return RW_REPLICAS;
    return RW_NONE;
}

/* A command: name and the first two arguments as captured (len > RF_ARG: kept only as a
 * length; UINT32_MAX: not captured). */
static void conv_request(rf_t *f, int nargs, uint32_t argc, int inl) {
    (void)inl;
    int id = nargs ? (f->rq_arglen[0] <= RF_ARG ? name_id(f->rq_args[0], f->rq_arglen[0])
                                                 : N_OTHER)
                   : N_OTHER;
    int kind = kind_of_name(id);
    /* Only what matching reads is kept, so plain commands run together. */
    rf_cmd_t c = {.kind = (uint8_t)kind, .id = (uint8_t)(kind == PLAIN ? 0 : id),
                  .argc = kind == K_SUB ? argc : 0};
#define ARG_IS(i, lit) (nargs > (i) + 1 && f->rq_arglen[(i) + 1] <= RF_ARG && \
                        ieq(f->rq_args[(i) + 1], f->rq_arglen[(i) + 1], lit))
    if (kind == PLAIN && !(f->reply_off || f->skip_next) && id != N_CLIENT) {
        q_push(&f->pending, &c);
        return;
    }
    if (id == N_CLUSTER && nargs > 1 && f->rq_arglen[1] <= RF_ARG)
        c.sub = (uint8_t)rw_of(f->rq_args[1], f->rq_arglen[1]);
    if (id == N_HELLO)
        c.sub = ARG_IS(0, "2") ? 2 : ARG_IS(0, "3") ? 3 : 0;
    if (id == N_CLIENT && ARG_IS(0, "reply") && !f->req_multi) {
        if (ARG_IS(1, "off")) {
            f->reply_off = 1;
            return;
        }
        if (ARG_IS(1, "skip")) {
            if (!f->reply_off)
                f->skip_next = 1;
            return;
        }
        if (ARG_IS(1, "on"))
            f->reply_off = f->skip_next = 0;
    } else if (kind == K_RESET) {
        f->reply_off = f->skip_next = 0;
    }
#undef ARG_IS
    if (kind == K_MULTI)
        f->req_multi = 1;
    else if (kind == K_EXEC || kind == K_DISCARD || kind == K_RESET)
        f->req_multi = 0;
    if (f->reply_off)
        return;
    if (f->skip_next) {
        f->skip_next = 0;
        return;
    }
    q_push(&f->pending, &c);
}

static int queued_needs_whole(const rf_t *f) {
    const rf_queue_t *q = &f->queued;
    for (uint32_t i = 0; i < q->len; i++) {
        int k = q->v[(q->head + i) & (q->cap - 1)].kind;
        if (k == WATCHED || k == K_HELLO)
            return 1;
    }
    return 0;
}

static int needs_whole(rf_t *f, int t) {
    rf_cmd_t *h = q_head(&f->pending);
    if (t == '-' || t == '>' || t == '|' || t == '!' || h == NULL)
        return 1;
    if (h->kind == PLAIN)
        return f->special;
    if (h->kind == K_EXEC)
        return queued_needs_whole(f);
    return 1;
}

static void end_multi(rf_t *f) {
    f->in_multi = 0;
    q_clear(&f->queued);
    update_special(f);
}

static void consume(rf_t *f) {
    int kind = f->pending.v[f->pending.head].kind;
    q_pop(&f->pending);
    if (kind == K_EXEC)
        end_multi(f);
}

static void hello(rf_t *f, int version) {
    if (version == 2 || version == 3) {
        f->protocol = (uint8_t)version;
        update_special(f);
    }
}

static const char *CONFIRMS[] = {"subscribe", "unsubscribe", "psubscribe", "punsubscribe",
                                 "ssubscribe", "sunsubscribe"};

static int is_message(const rf_elem_t *e) {
    return e->isbytes && (ieq(e->head, e->vlen, "message") || ieq(e->head, e->vlen, "pmessage") ||
                          ieq(e->head, e->vlen, "smessage"));
}

/* A subscription confirmation: 1 matched to the head, 0 unsolicited, -1 not one. */
static int pubsub(rf_t *f, const char *raw, size_t n, const rf_agg_t *a, rf_cmd_t *head,
                  int *matched_cmd) {
    rf_elem_t first, second;
    if (a->count == 0 && !a->streamed)
        return -1;
    if (nth(raw, n, a, 0, &first) < 0 || !first.isbytes)
        return -1;
    int c = -1;
    for (int k = 0; k < 6; k++)
        if (ieq(first.head, first.vlen, CONFIRMS[k]))
            c = k;
    if (c < 0)
        return -1;
    int which = c / 2, adds = !(c & 1);
    static const int sub_ids[] = {N_SUBSCRIBE, N_UNSUBSCRIBE, N_PSUBSCRIBE, N_PUNSUBSCRIBE,
                                  N_SSUBSCRIBE, N_SUNSUBSCRIBE};
    int has_channel = nth(raw, n, a, 1, &second) == 0 && second.isbytes;
    rf_set_t *subs = &f->subs[which];
    int matched = head != NULL && head->kind == K_SUB && head->id == sub_ids[c];
    if (matched && f->sub_left < 0) {
        int64_t argc = head->argc;
        f->sub_left = argc > 0 ? argc : (subs->n > 1 ? subs->n : 1);
    }
    if (has_channel) {
        if (adds)
            set_add(subs, second.hash);
        else
            set_del(subs, second.hash);
    }
    if (!matched) {
        update_special(f);
        return 0;
    }
    if (--f->sub_left <= 0) {
        q_pop(&f->pending);
        f->sub_left = -1;
    }
    update_special(f);
    *matched_cmd = 1;
    return 1;
}

/* Match one whole reply frame (Conversation.reply). Sets *cmd_rw to the CLUSTER rewriter
 * of the command it answers (not queued), or *exec to 1 for an EXEC whose results line
 * up with the queued commands (f->spec then says each one's rewriter). -1: parse() would
 * have failed (the connection closes). */
static int conv_reply(rf_t *f, const char *raw, size_t n, int *cmd_rw, int *exec,
                      size_t *nspec) {
    int t = (unsigned char)raw[0];
    rf_agg_t a;
    int parsed = 0;
    *cmd_rw = RW_NONE;
    *exec = 0;
    if (t == '|') {
        if (agg(raw, n, &a) < 0)
            return -1;
        parsed = 1;
        t = a.kind;
    }
    rf_cmd_t *head = q_head(&f->pending);
    int dummy = 0;
    if (t == '>') {
        if (!parsed && agg(raw, n, &a) < 0)
            return -1;
        pubsub(f, raw, n, &a, head, &dummy);
        return 0;
    }
    if (t == '*' && f->protocol == 2 && (subscribed(f) || (head && head->kind == K_SUB))) {
        if (!parsed && agg(raw, n, &a) < 0)
            return -1;
        parsed = 1;
        rf_elem_t first;
        if (a.count != 0 || a.streamed) {
            if (nth(raw, n, &a, 0, &first) == 0 && is_message(&first))
                return 0;
        }
        if (pubsub(f, raw, n, &a, head, &dummy) >= 0)
            return 0;
    }
    if (head == NULL)
        return 0;
    rf_cmd_t cmd = *head;
    int is_error = t == '-' || t == '!';
    if (f->in_multi && cmd.kind != K_EXEC && cmd.kind != K_DISCARD && cmd.kind != K_RESET) {
        q_pop(&f->pending);
        if (n == 9 && memcmp(raw, "+QUEUED\r\n", 9) == 0)
            q_push(&f->queued, &cmd);
        return 0;
    }
    q_pop(&f->pending);
    switch (cmd.kind) {
    case K_SUB:
        f->sub_left = -1;
        break;
    case K_MULTI:
        if (n == 5 && memcmp(raw, "+OK\r\n", 5) == 0) {
            f->in_multi = 1;
            q_clear(&f->queued);
            update_special(f);
        }
        break;
    case K_EXEC: {
        int was_multi = f->in_multi;
        rf_queue_t q = f->queued;
        f->queued = (rf_queue_t){0};
        end_multi(f);
        int rc = 0;
        if (was_multi && t == '*') {
            if (!parsed && agg(raw, n, &a) < 0) {
                q_clear(&q);
                return -1;
            }
            uint64_t total = q_total(&q);
            int64_t count = a.count < 0 ? 0 : a.count;
            if (a.streamed) {
                count = 0;
                for (size_t p = a.first; p < n && raw[p] != '.'; count++) {
                    rf_elem_t e;
                    if (elem(raw, n, p, &e) < 0) {
                        q_clear(&q);
                        return -1;
                    }
                    p = e.end;
                }
            }
            if ((uint64_t)count == total) {
                int any = 0;
                size_t p = a.first, k = 0;
                if (total > f->speccap) {
                    uint8_t *s = realloc(f->spec, total);
                    if (s == NULL) {
                        q_clear(&q);
                        return -1;
                    }
                    f->spec = s;
                    f->speccap = total;
                }
                for (uint32_t r = 0; r < q.len; r++) {
                    rf_cmd_t *c = &q.v[(q.head + r) & (q.cap - 1)];
                    for (uint32_t j = 0; j < c->count; j++, k++) {
                        rf_elem_t e;
                        if (elem(raw, n, p, &e) < 0) {
                            q_clear(&q);
                            return -1;
                        }
                        p = e.end;
                        if (c->kind == K_HELLO && e.kind != '-' && e.kind != '!')
                            hello(f, c->sub);
                        f->spec[k] = c->kind == WATCHED ? c->sub : RW_NONE;
                        any |= f->spec[k] != RW_NONE;
                    }
                }
                if (any && total) {
                    *exec = 1;
                    *nspec = total;
                }
            }
        }
        q_clear(&q);
        return rc;
    }
    case K_DISCARD:
        end_multi(f);
        break;
    case K_HELLO:
        if (!is_error)
            hello(f, cmd.sub);
        break;
    case K_RESET:
        if (n == 8 && memcmp(raw, "+RESET\r\n", 8) == 0) {
            f->protocol = 2;
            f->in_multi = 0;
            q_clear(&f->queued);
            for (int k = 0; k < 3; k++)
                set_clear(&f->subs[k]);
            update_special(f);
        }
        break;
    default:
        break;
    }
    if (cmd.kind == WATCHED && cmd.sub != RW_NONE)
        *cmd_rw = cmd.sub;
    return 0;
}

/* -- requests (requests.py RequestParser) --------------------------------------- */

static void rq_start(rf_t *f, int64_t count) {
    f->rq_left = f->rq_total = count;
    f->rq_nargs = 0;
    f->rq_capturing = 1;
}

/* An argument was read: value (a prefix of it, len its full length) if captured. */
static void rq_done_arg(rf_t *f, int have, uint32_t len) {
    if (f->rq_capturing) {
        if (!have || f->rq_nargs > 2) {
            f->rq_capturing = 0;
        } else {
            f->rq_arglen[f->rq_nargs++] = len;
            if (f->rq_nargs == 1 && !(len <= RF_ARG && captured_name(name_id(f->rq_args[0], len))))
                f->rq_capturing = 0;
        }
    }
    if (--f->rq_left)
        return;
    conv_request(f, f->rq_nargs, (uint32_t)(f->rq_total - 1), 0);
}

static int hexv(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = lower(c);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static int ws(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 11 || c == 12; }

/* split_inline: the first three arguments kept (prefixes), all counted. */
static int split_inline(rf_t *f, const char *line, size_t n, uint32_t *argc) {
    const char *nul = memchr(line, 0, n);
    if (nul)
        n = (size_t)(nul - line);
    size_t i = 0;
    uint32_t count = 0;
    for (;;) {
        while (i < n && ws((unsigned char)line[i]))
            i++;
        if (i >= n) {
            *argc = count;
            return 0;
        }
        size_t len = 0;
        char *cur = count < 3 ? f->rq_args[count] : NULL;
#define ADD(ch) do { if (cur && len < RF_ARG) cur[len] = (char)(ch); len++; } while (0)
        int quote = 0;
        for (;;) {
            int c = i < n ? (unsigned char)line[i] : 0;
            if (quote == '"') {
                if (c == '\\' && i + 3 < n && line[i + 1] == 'x' &&
                        hexv((unsigned char)line[i + 2]) >= 0 && hexv((unsigned char)line[i + 3]) >= 0) {
                    ADD(hexv((unsigned char)line[i + 2]) * 16 + hexv((unsigned char)line[i + 3]));
                    i += 3;
                } else if (c == '\\' && i + 1 < n) {
                    i++;
                    int e = (unsigned char)line[i];
                    ADD(e == 'n' ? 10 : e == 'r' ? 13 : e == 't' ? 9 : e == 'b' ? 8 : e == 'a' ? 7 : e);
                } else if (c == '"') {
                    if (i + 1 < n && !ws((unsigned char)line[i + 1]))
                        return -1;
                    i++;
                    break;
                } else if (i >= n) {
                    return -1;
                } else {
                    ADD(c);
                }
            } else if (quote == '\'') {
                if (c == '\\' && i + 1 < n && line[i + 1] == '\'') {
                    i++;
                    ADD('\'');
                } else if (c == '\'') {
                    if (i + 1 < n && !ws((unsigned char)line[i + 1]))
                        return -1;
                    i++;
                    break;
                } else if (i >= n) {
                    return -1;
                } else {
                    ADD(c);
                }
            } else {
                if (i >= n || c == ' ' || c == '\n' || c == '\r' || c == '\t')
                    break;
                if (c == '"' || c == '\'')
                    quote = c;
                else
                    ADD(c);
            }
            i++;
        }
#undef ADD
        if (count < 3)
            f->rq_arglen[count] = len > UINT32_MAX ? UINT32_MAX : (uint32_t)len;
        count++;
    }
}

static const char *find_crlf(const char *p, size_t n) {
    for (;;) {
        const char *cr = memchr(p, '\r', n);
        if (cr == NULL || (size_t)(cr - p) + 1 >= n)
            return NULL;
        if (cr[1] == '\n')
            return cr;
        n -= (size_t)(cr - p) + 1;
        p = cr + 1;
    }
}

/* RequestParser._whole: a complete, well-formed multibulk command at d[pos:n]; its end
 * or 0 (take the byte-by-byte path). */
static size_t rq_whole(rf_t *f, const char *d, size_t n, size_t pos) {
    const char *nl = find_crlf(d + pos, n - pos);
    int64_t count, size;
    if (nl == NULL || pyint(d + pos + 1, (size_t)(nl - d) - pos - 1, &count) < 0)
        return 0;
    if (count <= 0 || count > 1048576)
        return 0;
    size_t p = (size_t)(nl - d) + 2;
    int keep = 3, nargs = 0;
    uint32_t lens[3];
    char args[3][RF_ARG];
    for (int64_t k = 0; k < count; k++) {
        if (p >= n || d[p] != '$')
            return 0;
        nl = find_crlf(d + p, n - p);
        if (nl == NULL || pyint(d + p + 1, (size_t)(nl - d) - p - 1, &size) < 0)
            return 0;
        size_t at = (size_t)(nl - d) + 2;
        if (size < 0 || size + 2 > (int64_t)(n - at))
            return 0;
        p = at + (size_t)size + 2;
        if (keep) {
            if (size <= 512 && nargs < keep) {
                lens[nargs] = (uint32_t)size;
                memcpy(args[nargs], d + at, size < RF_ARG ? (size_t)size : RF_ARG);
                nargs++;
                if (nargs == 1 && !(size <= RF_ARG && captured_name(name_id(args[0], (size_t)size))))
                    keep = 0;
            } else {
                keep = 0;
            }
        }
    }
    memcpy(f->rq_args, args, sizeof(args));
    memcpy(f->rq_arglen, lens, sizeof(lens));
    conv_request(f, nargs, (uint32_t)(count - 1), 0);
    return p;
}

static int rq_feed(rf_t *f, const char *d, size_t n) {
    size_t pos = 0;
    for (;;) {
        if (!f->rq_left && !f->rq_skip && !f->rq_linelen && pos < n && d[pos] == '*') {
            size_t end = rq_whole(f, d, n, pos);
            if (end) {
                pos = end;
                continue;
            }
        }
        if (f->rq_skip) {
            int64_t take = f->rq_skip < (int64_t)(n - pos) ? f->rq_skip : (int64_t)(n - pos);
            if (f->rq_capping) {
                /* bytes of the payload (and its CRLF) arriving: keep the first ones */
                uint32_t i = f->rq_nargs;
                int64_t done = (int64_t)f->rq_arglen[i] + 2 - f->rq_skip;
                for (int64_t k = 0; k < take && done + k < RF_ARG; k++)
                    f->rq_args[i][done + k] = d[pos + k];
            }
            pos += (size_t)take;
            f->rq_skip -= take;
            if (f->rq_skip)
                return 0;
            int have = f->rq_capping;
            f->rq_capping = 0;
            rq_done_arg(f, have, have ? f->rq_arglen[f->rq_nargs] : 0);
            continue;
        }
        if (pos >= n)
            return 0;
        const char *nlp = memchr(d + pos, '\n', n - pos);
        if (nlp == NULL) {
            if (grow(&f->rq_line, &f->rq_linecap, f->rq_linelen + (n - pos)) < 0)
                return -1;
            memcpy(f->rq_line + f->rq_linelen, d + pos, n - pos);
            f->rq_linelen += (uint32_t)(n - pos);
            if (f->rq_linelen > RF_MAX_INLINE)
                return -1;
            return 0;
        }
        const char *line;
        size_t ll, take = (size_t)(nlp - d) + 1 - pos;
        if (f->rq_linelen) {
            if (grow(&f->rq_line, &f->rq_linecap, f->rq_linelen + take) < 0)
                return -1;
            memcpy(f->rq_line + f->rq_linelen, d + pos, take);
            line = f->rq_line;
            ll = f->rq_linelen + take;
            f->rq_linelen = 0;
        } else {
            line = d + pos;
            ll = take;
        }
        pos += take;
        int64_t v;
        if (f->rq_left) {
            if (line[0] != '$' || ll < 4 || line[ll - 2] != '\r')
                return -1;
            if (pyint(line + 1, ll - 3, &v) < 0 || v < 0 || v > RF_MAX_BULK)
                return -1;
            int keep = f->rq_capturing && v <= 512 && f->rq_nargs <= 2;
            if (v + 2 <= (int64_t)(n - pos)) {
                if (keep)
                    memcpy(f->rq_args[f->rq_nargs], d + pos, v < RF_ARG ? (size_t)v : RF_ARG);
                pos += (size_t)v + 2;
                rq_done_arg(f, keep, (uint32_t)v);
            } else {
                f->rq_skip = v + 2;
                if (keep) {
                    f->rq_capping = 1;
                    f->rq_arglen[f->rq_nargs] = (uint32_t)v;
                }
            }
            continue;
        }
        if (line[0] == '*') {
            if (ll < 4 || line[ll - 2] != '\r')
                return -1;
            if (pyint(line + 1, ll - 3, &v) < 0 || v > 1024 * 1024)
                return -1;
            if (v <= 0)
                continue;
            rq_start(f, v);
            continue;
        }
        uint32_t argc;
        size_t body = ll >= 2 && line[ll - 2] == '\r' ? ll - 2 : ll - 1;
        if (split_inline(f, line, body, &argc) < 0)
            return -1;
        if (argc)
            conv_request(f, argc < 3 ? (int)argc : 3, argc - 1, 1);
    }
}

void rf_request(rf_t *f, const char *p, size_t n) {
    if (f->mc) {
        mc_request(f, p, n);
        return;
    }
    if (f->request_error || f->opaque)
        return;
    if (rq_feed(f, p, n) < 0) {
        f->request_error = 1;
        free(f->rq_line);
        f->rq_line = NULL;
        f->rq_linelen = f->rq_linecap = 0;
    }
}

static void hold_drop(rf_t *f);

/* -- the reply driver (ClusterRewriter.feed_reply / _on_frame) ------------------- */

void rf_init(rf_t *f, rf_lookup_fn lookup, void *ctx) {
    memset(f, 0, sizeof(*f));
    f->protocol = 2;
    f->sub_left = -1;
    f->lookup = lookup;
    f->lookup_ctx = ctx;
}

void rf_free(rf_t *f) {
    free(f->sc.stack);
    free(f->sc.line);
    free(f->rq_line);
    q_clear(&f->pending);
    q_clear(&f->queued);
    for (int k = 0; k < 3; k++)
        set_clear(&f->subs[k]);
    free(f->hold);
    free(f->out);
    free(f->spec);
    memset(f, 0, sizeof(*f));
}

size_t rf_held(const rf_t *f) { return f->holdlen; }

int rf_idle(const rf_t *f) {
    if (f->mc)
        return mc_idle(f);
    return !f->pending.len && !f->queued.len && scan_idle(&f->sc) && !f->rq_left &&
           !f->rq_skip && !f->rq_linelen && !f->rq_capping && f->protocol == 2 &&
           !f->in_multi && !f->req_multi && !f->reply_off && !f->skip_next && !f->opaque &&
           !f->request_error && !f->subs[0].n && !f->subs[1].n && !f->subs[2].n &&
           f->sub_left < 0 && !f->holdlen && !f->special;
}

void rf_rebind(rf_t *f, rf_lookup_fn lookup, void *ctx) {
    f->lookup = lookup;
    f->lookup_ctx = ctx;
    f->redirects = 0;
    f->mc = f->mc_started = f->mc_cont = 0;
}

void rf_protocol(rf_t *f, int mc) { f->mc = mc != 0; }

uint64_t rf_pending(const rf_t *f) { return q_total(&f->pending); }

void rf_release(rf_t *f) {
    if (f->hold != NULL && f->holdlen == 0)
        hold_drop(f);
    free(f->out);
    f->out = NULL;
}

static int all_digits(const char *p, size_t n) {
    if (!n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] < '0' || p[i] > '9')
            return 0;
    return 1;
}

/* parse_redirect + a lookup in the node map: 1 rewritten into f->out (*len), 0 not a
 * redirect, 2 a redirect Python must map (empty host, '?', not in the map). */
static int redirect(rf_t *f, const char *raw, size_t n, size_t *len) {
    size_t k;
    if (n >= 7 && memcmp(raw, "-MOVED ", 7) == 0)
        k = 5;
    else if (n >= 5 && memcmp(raw, "-ASK ", 5) == 0)
        k = 3;
    else
        return 0;
    if (raw[n - 2] != '\r' || raw[n - 1] != '\n')
        return 0;
    const char *body = raw + 1, *end = raw + n - 2;
    const char *sp1 = body + k;                      /* the space after the kind */
    const char *slot = sp1 + 1;
    const char *sp2 = memchr(slot, ' ', (size_t)(end - slot));
    if (sp2 == NULL)
        return 0;
    const char *addr = sp2 + 1;
    if (memchr(addr, ' ', (size_t)(end - addr)) != NULL)
        return 0;
    if (!all_digits(slot, (size_t)(sp2 - slot)))
        return 0;
    const char *colon = NULL;
    for (const char *q = end; q > addr; q--)
        if (q[-1] == ':') {
            colon = q - 1;
            break;
        }
    if (colon == NULL || !all_digits(colon + 1, (size_t)(end - colon - 1)))
        return 0;
    size_t hlen = (size_t)(colon - addr);
    if (hlen == 0 || (hlen == 1 && addr[0] == '?') || f->lookup == NULL)
        return 2;
    const char *pd = colon + 1;
    size_t pl = (size_t)(end - pd);
    while (pl > 1 && *pd == '0') {
        pd++;
        pl--;
    }
    if (pl > 5)
        return 2;
    unsigned port = 0;
    for (size_t i = 0; i < pl; i++)
        port = port * 10 + (unsigned)(pd[i] - '0');
    /* slot, as Python prints int(slot): no leading zeros */
    const char *sd = slot;
    size_t sl = (size_t)(sp2 - slot);
    while (sl > 1 && *sd == '0') {
        sd++;
        sl--;
    }
    size_t need = 1 + k + 1 + sl + 1 + 300 + 2;
    free(f->out);
    f->out = malloc(need);
    if (f->out == NULL)
        return 2;
    char *o = f->out;
    memcpy(o, raw, 1 + k + 1);
    o += 1 + k + 1;
    memcpy(o, sd, sl);
    o += sl;
    *o++ = ' ';
    int m = f->lookup(f->lookup_ctx, addr, hlen, port, o, 300);
    if (m < 0)
        return 2;
    o += m;
    *o++ = '\r';
    *o++ = '\n';
    *len = (size_t)(o - f->out);
    return 1;
}

/* _on_frame: a whole frame at raw[0:n]. RF_DONE (unchanged), RF_EMIT (f->out),
 * RF_ASK (Python), RF_ERROR. */
static int on_frame(rf_t *f, const char *raw, size_t n, rf_out_t *o) {
    int rw, exec;
    size_t nspec = 0;
    if (conv_reply(f, raw, n, &rw, &exec, &nspec) < 0)
        return RF_ERROR;
    if (raw[0] == '-') {
        size_t len = 0;
        int r = redirect(f, raw, n, &len);
        if (r == 1) {
            f->redirects++;
            o->data = f->out;
            o->len = len;
            o->redirect = 1;
            return RF_EMIT;
        }
        if (r == 2) {
            o->ask = RF_ASK_REDIRECT;
            return RF_ASK;
        }
        return RF_DONE;
    }
    if (rw != RW_NONE) {
        o->ask = RF_ASK_CLUSTER;
        if (f->speccap < 1) {
            uint8_t *s = realloc(f->spec, 1);
            if (s == NULL)
                return RF_ERROR;
            f->spec = s;
            f->speccap = 1;
        }
        f->spec[0] = (uint8_t)rw;
        o->spec = f->spec;
        o->speclen = 1;
        return RF_ASK;
    }
    if (exec) {
        o->ask = RF_ASK_EXEC;
        o->spec = f->spec;
        o->speclen = nspec;
        return RF_ASK;
    }
    return RF_DONE;
}

static int hold_add(rf_t *f, const char *p, size_t n) {
    if ((int64_t)(f->holdlen + n) > RF_MAX_HOLD)
        return -1;
    if (f->holdlen + n > f->holdcap) {
        size_t c = f->holdcap ? f->holdcap : 256;
        while (c < f->holdlen + n)
            c *= 2;
        char *h = realloc(f->hold, c);
        if (h == NULL)
            return -1;
        f->hold = h;
        f->holdcap = c;
    }
    memcpy(f->hold + f->holdlen, p, n);
    f->holdlen += n;
    return 0;
}

int rf_hold(rf_t *f, const char *p, size_t n) { return hold_add(f, p, n); }

static void hold_drop(rf_t *f) {
    free(f->hold);
    f->hold = NULL;
    f->holdlen = f->holdcap = 0;
}

size_t rf_reply(rf_t *f, const char *p, size_t n, rf_out_t *o, int *action) {
    memset(o, 0, sizeof(*o));
    *action = RF_DONE;
    if (f->hold != NULL && f->holdlen == 0)
        hold_drop(f);  /* emitted by the last call */
    free(f->out);
    f->out = NULL;
    if (f->mc)
        return mc_reply(f, p, n, o, action);
    if (f->opaque) {
        o->fwd = n;
        return n;
    }
    size_t pos = 0;
    if (f->holdlen) {
        ssize_t end = scan(&f->sc, p, n, 0);
        if (end == -2) {
            *action = RF_ERROR;
            return n;
        }
        if (end < 0) {
            if (hold_add(f, p, n) < 0)
                *action = RF_ERROR;
            return n;
        }
        if (hold_add(f, p, (size_t)end) < 0) {
            *action = RF_ERROR;
            return n;
        }
        int r = on_frame(f, f->hold, f->holdlen, o);
        if (r == RF_ERROR) {
            *action = RF_ERROR;
            return n;
        }
        if (r == RF_DONE) {
            o->data = f->hold;
            o->len = f->holdlen;
            r = RF_EMIT;
        } else if (r == RF_ASK) {
            o->data = f->hold;
            o->len = f->holdlen;
        }
        f->holdlen = 0;  /* the buffer lives till the next call */
        *action = r;
        return (size_t)end;
    } else if (!scan_idle(&f->sc)) {
        ssize_t end = scan(&f->sc, p, n, 0);
        if (end == -2) {
            *action = RF_ERROR;
            return n;
        }
        if (end < 0) {
            o->fwd = n;
            return n;
        }
        pos = (size_t)end;
    }
    while (pos < n) {
        int t = (unsigned char)p[pos];
        rf_cmd_t *h = q_head(&f->pending);
        if (!f->special && h && h->kind == PLAIN && t != '-' && t != '>' && t != '|' &&
                t != '!') {
            q_pop(&f->pending);
        } else if (h && h->kind == K_OPAQUE) {
            f->opaque = 1;
            o->fwd = n;
            return n;
        } else if (!needs_whole(f, t)) {
            consume(f);
        } else {
            size_t start = pos;
            ssize_t end = scan(&f->sc, p, n, pos);
            if (end == -2) {
                *action = RF_ERROR;
                return n;
            }
            if (end < 0) {
                if (hold_add(f, p + start, n - start) < 0) {
                    *action = RF_ERROR;
                    return n;
                }
                o->fwd = start;
                return n;
            }
            int r = on_frame(f, p + start, (size_t)end - start, o);
            if (r == RF_ERROR) {
                *action = RF_ERROR;
                return n;
            }
            if (r == RF_EMIT || r == RF_ASK) {
                if (r == RF_ASK) {
                    o->data = p + start;
                    o->len = (size_t)end - start;
                }
                o->fwd = start;
                *action = r;
                return (size_t)end;
            }
            pos = (size_t)end;
            continue;
        }
        ssize_t end = scan(&f->sc, p, n, pos);
        if (end == -2) {
            *action = RF_ERROR;
            return n;
        }
        if (end < 0)
            break;
        pos = (size_t)end;
    }
    o->fwd = n;
    return n;
}
