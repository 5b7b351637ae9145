/* A whole reply in the RESP framer (resp_internal.h): matching.py's Conversation, its
 * reply side, pairs it with the command it answers (the request side is in
 * resp_request.c), and _on_frame decides what becomes of it: a -MOVED/-ASK whose node
 * the map knows is rewritten here (parse_redirect), a reply that lists nodes goes to
 * Python, any other goes on unchanged. Pending commands are kept as runs, so a long
 * pipeline of plain commands takes one entry; pub/sub channels as sets of hashes.
 * Allocation happens only for what is rare: MULTI, pub/sub, a rewritten redirect. */
#include "resp_internal.h"

#include <stdlib.h>
#include <string.h>

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

/* -- queues of command runs (q_head, q_push, q_pop: resp_internal.h) ---------------- */

int rf_q_grow(rf_queue_t *q) {
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

/* -- matching (matching.py Conversation.reply) ----------------------------------- */

static int subscribed(const rf_t *f) { return f->subs[0].n || f->subs[1].n || f->subs[2].n; }

static void update_special(rf_t *f) {
    f->special = f->in_multi || (f->protocol == 2 && subscribed(f));
}

void rf_end_multi(rf_t *f) {
    f->in_multi = 0;
    rf_q_clear(&f->queued);
    update_special(f);
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
static int conv_reply(rf_t *f, const char *raw, size_t n, int *cmd_rw, int *exec,
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
        rf_end_multi(f);
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
        rf_end_multi(f);
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

/* -- what becomes of a whole reply (ClusterRewriter._on_frame) -------------------- */

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
int rf_on_frame(rf_t *f, const char *raw, size_t n, rf_out_t *o) {
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
