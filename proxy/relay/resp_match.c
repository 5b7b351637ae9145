/* The matching part of the RESP framer (resp_internal.h): matching.py's Conversation,
 * which pairs each reply with the command it answers. Pending commands are kept as runs,
 * so a long pipeline of plain commands takes one entry; pub/sub channels as sets of
 * hashes. Allocation happens only for what is rare: MULTI, pub/sub. */
#include "resp_internal.h"

#include <stdlib.h>
#include <string.h>

/* -- command names --------------------------------------------------------------- */

static const char *NAMES[] = {"", "cluster", "client", "multi", "exec", "discard", "hello",
                              "reset", "subscribe", "psubscribe", "ssubscribe", "unsubscribe",
                              "punsubscribe", "sunsubscribe", "monitor", "sync", "psync"};
#define NNAMES (sizeof(NAMES) / sizeof(NAMES[0]))

int rf_name_id(const char *a, size_t n) {
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

void rf_set_clear(rf_set_t *s) {
    free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}

/* -- queues of command runs (q_head, q_pop: resp_internal.h) ---------------------- */

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

uint64_t rf_q_total(const rf_queue_t *q) {
    uint64_t t = 0;
    for (uint32_t i = 0; i < q->len; i++)
        t += q->v[(q->head + i) & (q->cap - 1)].count;
    return t;
}

void rf_q_clear(rf_queue_t *q) {
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
void rf_conv_request(rf_t *f, int nargs, uint32_t argc, int inl) {
    (void)inl;
    int id = nargs ? (f->rq_arglen[0] <= RF_ARG ? rf_name_id(f->rq_args[0], f->rq_arglen[0])
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

int rf_needs_whole(rf_t *f, int t) {
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
    rf_q_clear(&f->queued);
    update_special(f);
}

void rf_consume(rf_t *f) {
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
    if (rf_nth(raw, n, a, 0, &first) < 0 || !first.isbytes)
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
    int has_channel = rf_nth(raw, n, a, 1, &second) == 0 && second.isbytes;
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
int rf_conv_reply(rf_t *f, const char *raw, size_t n, int *cmd_rw, int *exec,
                      size_t *nspec) {
    int t = (unsigned char)raw[0];
    rf_agg_t a;
    int parsed = 0;
    *cmd_rw = RW_NONE;
    *exec = 0;
    if (t == '|') {
        if (rf_read_agg(raw, n, &a) < 0)
            return -1;
        parsed = 1;
        t = a.kind;
    }
    rf_cmd_t *head = q_head(&f->pending);
    int dummy = 0;
    if (t == '>') {
        if (!parsed && rf_read_agg(raw, n, &a) < 0)
            return -1;
        pubsub(f, raw, n, &a, head, &dummy);
        return 0;
    }
    if (t == '*' && f->protocol == 2 && (subscribed(f) || (head && head->kind == K_SUB))) {
        if (!parsed && rf_read_agg(raw, n, &a) < 0)
            return -1;
        parsed = 1;
        rf_elem_t first;
        if (a.count != 0 || a.streamed) {
            if (rf_nth(raw, n, &a, 0, &first) == 0 && is_message(&first))
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
            rf_q_clear(&f->queued);
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
            if (!parsed && rf_read_agg(raw, n, &a) < 0) {
                rf_q_clear(&q);
                return -1;
            }
            uint64_t total = rf_q_total(&q);
            int64_t count = a.count < 0 ? 0 : a.count;
            if (a.streamed) {
                count = 0;
                for (size_t p = a.first; p < n && raw[p] != '.'; count++) {
                    rf_elem_t e;
                    if (rf_read_elem(raw, n, p, &e) < 0) {
                        rf_q_clear(&q);
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
                        rf_q_clear(&q);
                        return -1;
                    }
                    f->spec = s;
                    f->speccap = total;
                }
                for (uint32_t r = 0; r < q.len; r++) {
                    rf_cmd_t *c = &q.v[(q.head + r) & (q.cap - 1)];
                    for (uint32_t j = 0; j < c->count; j++, k++) {
                        rf_elem_t e;
                        if (rf_read_elem(raw, n, p, &e) < 0) {
                            rf_q_clear(&q);
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
        rf_q_clear(&q);
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
            rf_q_clear(&f->queued);
            for (int k = 0; k < 3; k++)
                rf_set_clear(&f->subs[k]);
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
