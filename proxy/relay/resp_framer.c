/* The RESP framer of a Redis Cluster connection (resp_framer.h says what it owns); this
 * file is its reply driver, its parts are listed in resp_internal.h.
 *
 * Each part follows its Python original line by line, so that the two give the same
 * output for any byte stream (tests/test_framer_fuzz.py): the scanner (resp_scan.c) is
 * proxy/protocols/resp/framing.py's Scanner, the request side (resp_request.c)
 * requests.py's RequestParser (both its whole-command fast path and its byte-by-byte
 * path, with their length parsing, which is Python's int()), the matching
 * (resp_match.c) matching.py's Conversation, and rf_reply here the driver of
 * redis_cluster/rewrite.py's ClusterRewriter.feed_reply, with parse_redirect's -MOVED/-ASK
 * rewrite. Pending commands are kept as runs, so a long pipeline of plain commands takes
 * one entry. Allocation happens only for what is rare: a header line cut by a chunk, a
 * frame that must be seen whole, nesting, pub/sub. */
#include "resp_internal.h"

#include "mc_framer.h"

#include <stdlib.h>
#include <string.h>

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
    rf_q_clear(&f->pending);
    rf_q_clear(&f->queued);
    for (int k = 0; k < 3; k++)
        rf_set_clear(&f->subs[k]);
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

uint64_t rf_pending(const rf_t *f) { return rf_q_total(&f->pending); }

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
    if (rf_conv_reply(f, raw, n, &rw, &exec, &nspec) < 0)
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
        ssize_t end = rf_scan(&f->sc, p, n, 0);
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
        ssize_t end = rf_scan(&f->sc, p, n, 0);
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
        } else if (!rf_needs_whole(f, t)) {
            rf_consume(f);
        } else {
            size_t start = pos;
            ssize_t end = rf_scan(&f->sc, p, n, pos);
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
        ssize_t end = rf_scan(&f->sc, p, n, pos);
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
