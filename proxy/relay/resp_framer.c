/* The RESP framer of a Redis Cluster connection (resp_framer.h says what it owns); this
 * file is its reply driver, its parts are listed in resp_internal.h.
 *
 * Each part follows its Python original line by line, so that the two give the same
 * output for any byte stream (tests/test_framer_fuzz.py): the scanner (resp_scan.c) is
 * proxy/protocols/resp/framing.py's Scanner, the request side (resp_request.c)
 * requests.py's RequestParser (both its whole-command fast path and its byte-by-byte
 * path, with their length parsing, which is Python's int()) and Conversation.request,
 * the reply side (resp_match.c) Conversation.reply and ClusterRewriter._on_frame with
 * parse_redirect's -MOVED/-ASK rewrite, and rf_reply here the driver of
 * redis_cluster/rewrite.py's ClusterRewriter.feed_reply. Pending commands are kept as
 * runs, so a long pipeline of plain commands takes one entry. Allocation happens only
 * for what is rare: a header line cut by a chunk, a frame that must be seen whole,
 * nesting, pub/sub. */
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
        int r = rf_on_frame(f, f->hold, f->holdlen, o);
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
        } else if (!needs_whole(f, t)) {
            consume(f);
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
            int r = rf_on_frame(f, p + start, (size_t)end - start, o);
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
