/* A framed (cluster) connection's way down in the engine (engine.h): every chunk from
 * the node goes through the framer (resp_framer.h, mc_framer.h) and out as it says, and
 * what Python must see waits on the tells queue till Engine.asks() takes it and
 * Engine.answer() sends the rewritten frame. The framing state is held only while the
 * conversation is not a fresh one's, and parked in a per-thread pool otherwise. */
#ifdef __linux__

#include "engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#define FPOOL_MAX 64     /* parked framing states kept per thread */

/* -- the framing state and its pool ----------------------------------------- */

void free_framed(framed_t *fr) {
    rf_free(&fr->rf);
    free(fr->backlog);
    free(fr->ask);
    free(fr->spec);
    free(fr->pre);
    free(fr);
}

/* The framing state of a framed connection about to read: its own, or a parked one. */
framed_t *take_framing(Engine *e, conn_t *c) {
    if (c->fr != NULL)
        return c->fr;
    framed_t *fr;
    if (e->nfpool) {
        fr = e->fpool[--e->nfpool];
    } else {
        fr = calloc(1, sizeof(*fr));
        if (fr == NULL)
            return NULL;
        rf_init(&fr->rf, NULL, NULL);
    }
    rf_rebind(&fr->rf, nm_lookup, c->nm);
    rf_protocol(&fr->rf, c->nm->mc);  /* Memcached or RESP (mc_framer.h) */
    c->fr = fr;
    return fr;
}

/* A framed connection whose conversation is back to a fresh one's gives its state to
 * the pool (nothing in flight, nothing held, nothing Python is looking at). */
void park_framing(Engine *e, conn_t *c) {
    framed_t *fr = c->fr;
    if (fr == NULL || fr->waiting || fr->bat < fr->bend || fr->ask != NULL ||
            fr->pre != NULL || c->w[1].pending || !rf_idle(&fr->rf))
        return;
    c->fr = NULL;
    rf_release(&fr->rf);
    free(fr->backlog);
    fr->backlog = NULL;
    fr->bat = fr->bend = 0;
    if (e->fpool == NULL)
        e->fpool = calloc(FPOOL_MAX, sizeof(*e->fpool));
    if (e->fpool != NULL && e->nfpool < FPOOL_MAX)
        e->fpool[e->nfpool++] = fr;
    else
        free_framed(fr);
}

/* -- the way down ----------------------------------------------------------- */

/* A note for Python (asks()); the event loop is woken to read it. */
static void tell(Engine *e, conn_t *c, uint8_t kind) {
    if (e->ntells == e->tellcap) {
        uint32_t cap = e->tellcap ? e->tellcap * 2 : 16;
        tell_t *t = realloc(e->tells, cap * sizeof(*t));
        if (t == NULL) {
            e->thread_errors++;
            return;
        }
        e->tells = t;
        e->tellcap = cap;
    }
    e->tells[e->ntells].tag = tag(c->slot, c->gen, 0);
    e->tells[e->ntells].kind = kind;
    e->ntells++;
    notify(e);
}

/* Keep p[0:n] (the unframed rest of a chunk) in the backlog; p may lie in it already. */
static int keep_backlog(framed_t *fr, const char *p, size_t n) {
    if (fr->backlog != NULL && p >= fr->backlog && p <= fr->backlog + fr->bend) {
        fr->bat = (size_t)(p - fr->backlog);
        return 0;
    }
    char *b = NULL;
    if (n) {
        b = malloc(n);
        if (b == NULL)
            return -1;
        memcpy(b, p, n);
    }
    free(fr->backlog);
    fr->backlog = b;
    fr->bat = 0;
    fr->bend = n;
    return 0;
}

static void drop_backlog(framed_t *fr) {
    free(fr->backlog);
    fr->backlog = NULL;
    fr->bat = fr->bend = 0;
}

/* The way down of a framed connection: frame p[0:n] and send what the framer says --
 * the bytes as read, a redirect rewritten here, or (after Python's answer) a frame
 * rewritten there. A short send or an ask parks the rest of the chunk in the backlog
 * and stops reading the node till it is out (writable(), answer()). */
void pump_reply(Engine *e, conn_t *c, const char *p, size_t n) {
    framed_t *fr = c->fr;
    way_t *w = &c->w[1];
    size_t off = 0;
    for (;;) {
        rf_out_t o;
        int act = RF_DONE;
        size_t used = 0;
        memset(&o, 0, sizeof(o));
        if (off < n)
            used = rf_reply(&fr->rf, p + off, n - off, &o, &act);
        else if (fr->pre == NULL)
            break;
        if (act == RF_ERROR) {
            /* Like the Python relay: a node that breaks the protocol gets a clean close
             * of both sides (a reset, the stream being cut) and a counter. */
            e->protocol_errors++;
            c->broken = 1;
            tell(e, c, TELL_BROKEN);
            finish(e, c, 1);
            return;
        }
        struct iovec iov[3];
        int cnt = 0;
        size_t total = 0;
        if (fr->pre != NULL) {  /* an answer goes out with what follows, as one write */
            iov[cnt].iov_base = fr->pre;
            iov[cnt++].iov_len = fr->prelen;
            total += fr->prelen;
        }
        if (o.fwd) {
            iov[cnt].iov_base = (void *)(p + off);
            iov[cnt++].iov_len = o.fwd;
            total += o.fwd;
        }
        if (act == RF_EMIT && o.len) {
            iov[cnt].iov_base = (void *)o.data;
            iov[cnt++].iov_len = o.len;
            total += o.len;
        }
        if (act == RF_EMIT && o.redirect)
            tell(e, c, TELL_REDIRECTS);
        if (act == RF_ASK) {
            free(fr->ask);
            free(fr->spec);
            fr->ask = malloc(o.len);
            fr->spec = malloc(o.speclen ? o.speclen : 1);
            if (fr->ask == NULL || fr->spec == NULL) {
                finish(e, c, 1);
                return;
            }
            memcpy(fr->ask, o.data, o.len);
            if (o.speclen)  /* a redirect has none */
                memcpy(fr->spec, o.spec, o.speclen);
            fr->asklen = o.len;
            fr->speclen = o.speclen;
            fr->askkind = (uint8_t)o.ask;
            fr->waiting = 1;
            tell(e, c, (uint8_t)o.ask);
        }
        off += used;
        ssize_t m = 0;
        if (total) {
            struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
            m = sendmsg(c->fd[0], &mh, MSG_NOSIGNAL);
            if (m < 0) {
                if (errno != EAGAIN && errno != EINTR) {
                    rf_release(&fr->rf);
                    lose(e, c, 0);
                    return;
                }
                m = 0;
            }
        }
        if ((size_t)m < total) {
            size_t left = total - (size_t)m, at = 0;
            w->held = malloc(left);
            if (w->held == NULL) {
                rf_release(&fr->rf);
                finish(e, c, 1);
                return;
            }
            for (int k = 0; k < cnt; k++) {
                size_t len = iov[k].iov_len, skip = (size_t)m < len ? (size_t)m : len;
                memcpy(w->held + at, (char *)iov[k].iov_base + skip, len - skip);
                at += len - skip;
                m -= (ssize_t)skip;
            }
            w->held_at = 0;
            w->pending = left;
            stall(w);
        }
        free(fr->pre);
        fr->pre = NULL;
        rf_release(&fr->rf);
        if (w->pending || fr->waiting) {
            if (keep_backlog(fr, p + off, n - off) < 0) {
                finish(e, c, 1);
                return;
            }
            w->watching = 0;
            return;
        }
    }
    drop_backlog(fr);
    park_framing(e, c);
}

/* -- Python's side (under the GIL) ------------------------------------------ */

/* asks() -> [(slot, kind, frame, spec)] what framed connections need from Python:
 * kind 1..3 a whole frame to rewrite (resp_framer.h RF_ASK_*; answer() with the bytes
 * to send instead), 0 a redirect the thread rewrote (frame: 1), 4 the node broke the
 * protocol (the connection is closed). */
PyObject *Engine_asks(Engine *e, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    pthread_mutex_lock(&e->lock);
    for (uint32_t k = 0; k < e->ntells; k++) {
        uint64_t t = e->tells[k].tag;
        uint32_t slot = (uint32_t)(t & 0xffffffffu) >> 1;
        conn_t *c = slot < e->nconns ? e->conns[slot] : NULL;
        if (c == NULL || c->gen != (uint32_t)(t >> 32))
            continue;
        PyObject *item = NULL;
        int kind = e->tells[k].kind;
        if (kind == TELL_BROKEN) {
            item = Py_BuildValue("(IiOO)", slot, kind, Py_None, Py_None);
        } else if (kind == TELL_REDIRECTS) {
            /* Counted even when the connection has ended since: a client that closes
             * right after its MOVED is the common case (reap() comes after this). */
            item = Py_BuildValue("(IiiO)", slot, kind, 1, Py_None);
        } else if (c->state != LIVE || c->nm == NULL) {
            continue;
        } else {
            framed_t *fr = c->fr;
            if (fr == NULL || !fr->waiting || fr->ask == NULL)
                continue;
            item = Py_BuildValue("(Iiy#y#)", slot, kind, fr->ask, (Py_ssize_t)fr->asklen,
                                 fr->spec, (Py_ssize_t)fr->speclen);
            if (item != NULL) {
                free(fr->ask);
                fr->ask = NULL;
            }
        }
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            memmove(e->tells, e->tells + k, (e->ntells - k) * sizeof(*e->tells));
            e->ntells -= k;
            pthread_mutex_unlock(&e->lock);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    e->ntells = 0;
    if (e->tellcap > 64) {
        free(e->tells);
        e->tells = NULL;
        e->tellcap = 0;
    }
    pthread_mutex_unlock(&e->lock);
    return out;
}

/* answer(slot, data): the bytes that go to the client in place of the frame asked
 * about; the way down sends them, then frames the rest of what it had read. */
PyObject *Engine_answer(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "ny*", &slot, &b))
        return NULL;
    pthread_mutex_lock(&e->lock);
    conn_t *c = (slot >= 0 && (size_t)slot < e->nconns) ? e->conns[slot] : NULL;
    if (c == NULL || c->state != LIVE || c->fr == NULL || !c->fr->waiting) {
        pthread_mutex_unlock(&e->lock);
        PyBuffer_Release(&b);
        Py_RETURN_FALSE;  /* ended meanwhile */
    }
    framed_t *fr = c->fr;
    way_t *w = &c->w[1];
    fr->waiting = 0;
    free(fr->ask);
    fr->ask = NULL;
    if (c->dead == 1) {
        /* The client failed: nothing more goes to it. */
        pthread_mutex_unlock(&e->lock);
        PyBuffer_Release(&b);
        Py_RETURN_FALSE;
    }
    size_t len = (size_t)b.len;
    char *held = malloc(w->pending + len + 1);
    if (held == NULL) {
        finish(e, c, 1);
    } else if (!w->pending) {
        /* Nothing queued: the thread sends it with the next bytes it frames (a client
         * may expect the answer and the END after it in one read). */
        memcpy(held, b.buf, len);
        fr->pre = held;
        fr->prelen = len;
        stall(w);
        rewatch(e, c, (uint32_t)slot);
    } else {
        if (w->pending)
            memcpy(held, w->held + w->held_at, w->pending);
        memcpy(held + w->pending, b.buf, len);
        free(w->held);
        w->held = held;
        w->held_at = 0;
        w->pending += len;
        stall(w);
        rewatch(e, c, (uint32_t)slot);
    }
    if (c->state == DONE && !c->claimed) {
        push_done(e, (uint32_t)slot);
        notify(e);
    }
    pthread_mutex_unlock(&e->lock);
    PyBuffer_Release(&b);
    Py_RETURN_TRUE;
}

#endif  /* __linux__ */
