/* The engine's thread (engine.h): the epoll loop, the epoll set, the events of a
 * connection, and how a connection ends -- a half-close, a side lost, a dying
 * connection's drain (settle, the sweep), the close or reset (finish). */
#ifdef __linux__

#include "engine.h"

#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define BATCH 128       /* events per epoll_wait */
#define SPIN_MAX_BATCH 2 /* busy_poll only after a batch this small: a larger one means load */
#define SWEEP_MS 10      /* how often dying connections are checked: deadline, send queue */

/* -- the epoll set ---------------------------------------------------------- */

/* Bring the epoll set in line with what the directions wait for. A socket stays
 * registered with an empty mask while nobody waits on it, so an RST still arrives
 * as EPOLLERR; only a HUP nobody can act on makes it deaf (handle()). */
void rewatch(Engine *e, conn_t *c, uint32_t slot) {
    uint32_t want[2];
    want[0] = (c->w[0].watching ? EPOLLIN : 0) | (c->w[1].stalled ? EPOLLOUT : 0);
    want[1] = (c->w[1].watching ? EPOLLIN : 0) | (c->w[0].stalled ? EPOLLOUT : 0);
    want[0] |= tls_want(c->tls, 0);  /* a handshake, or a record layer that needs the other */
    want[1] |= tls_want(c->tls, 1);
    for (int s = 0; s < 2; s++) {
        int op;
        if (want[s] == 0 && c->deaf[s]) {
            if (!c->reg[s])
                continue;
            op = EPOLL_CTL_DEL;
        } else {
            c->deaf[s] = 0;
            if (c->reg[s] && want[s] == c->mask[s])
                continue;
            op = c->reg[s] ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
        }
        struct epoll_event ev = {.events = want[s], .data.u64 = tag(slot, c->gen, s)};
        if (epoll_ctl(e->epfd, op, c->fd[s], &ev) < 0) {
            finish(e, c, 1);
            return;
        }
        c->reg[s] = op != EPOLL_CTL_DEL;
        c->mask[s] = want[s];
    }
}

/* -- how a connection ends -------------------------------------------------- */

static void half_close(Engine *e, conn_t *c, int i) {
    way_t *w = &c->w[i];
    if (!c->first)
        c->first = (uint8_t)(1 + i);
    w->eof = 1;
    w->watching = 0;
    tls_close_notify(c->tls, 1 - i);
    if (shutdown(c->fd[1 - i], SHUT_WR) < 0) {
        lose(e, c, 1 - i);  /* ENOTCONN: it was reset */
        return;
    }
    if (c->w[0].eof && c->w[1].eof)
        finish(e, c, 0);
}

static int push_dying(Engine *e, conn_t *c) {
    if (e->ndying == e->dyingcap) {
        uint32_t cap = e->dyingcap ? e->dyingcap * 2 : 16;
        uint64_t *d = realloc(e->dying, cap * sizeof(*d));
        if (d == NULL)
            return 0;
        e->dying = d;
        e->dyingcap = cap;
    }
    e->dying[e->ndying++] = tag(c->slot, c->gen, 0);
    return 1;
}

/* A dying connection whose failed side has nothing more to deliver: reset the other
 * once its kernel has sent all of it (SIOCOUTQ: bytes not yet acknowledged) -- an RST
 * drops what still waits in the send queue. The sweep asks again till the deadline. */
void settle(Engine *e, conn_t *c) {
    int s = c->dead - 1, queued = 0;
    way_t *out = &c->w[s];
    out->eof = 1;
    out->watching = 0;
    if (out->pending || framing_busy(c, s))
        return;  /* writable() (or answer()) empties it, then comes back here */
    if (ioctl(c->fd[1 - s], SIOCOUTQ, &queued) < 0 || queued == 0)
        finish(e, c, 1);
}

/* Side s failed: a reset, or an error on a write to it. Nothing more reaches it, so
 * the way into it is cut (its bytes have nowhere to go). Its socket's receive queue
 * is final, and a direct peer would still read it: the way out of s reads it to the
 * end and delivers it, then the connection resets (settle()) -- or at the deadline,
 * if the other peer stops reading. A second failure resets at once. */
void lose(Engine *e, conn_t *c, int s) {
    way_t *in = &c->w[1 - s], *out = &c->w[s];
    if (!c->first)
        c->first = (uint8_t)(3 + s);
    if (c->dead) {
        finish(e, c, 1);
        return;
    }
    release_way(e, in, 1);
    in->pending = 0;
    in->eof = 1;  /* reads no more */
    c->dead = (uint8_t)(1 + s);
    c->deadline = now_s() + e->drain_grace;
    if (!push_dying(e, c)) {
        finish(e, c, 1);
        return;
    }
    if (out->eof && !out->pending && !framing_busy(c, s))
        settle(e, c);
    else if (out->stalled)
        c->deaf[s] = 1;  /* its EPOLLERR/HUP would repeat; back when out resumes */
    else if (!framing_busy(c, s))
        out->watching = !out->eof;
}

/* Way i's source ended (EOF, or an error: a reset) while the connection is dying:
 * nothing more to deliver. Outside a drain, an error on a read means side i failed. */
void source_ended(Engine *e, conn_t *c, int i, int error) {
    if (c->dead) {
        if (c->dead == 1 + i)
            settle(e, c);
        else
            finish(e, c, 1);
    } else if (error) {
        c->w[i].eof = 1;
        lose(e, c, i);
    } else {
        half_close(e, c, i);
    }
}

void push_done(Engine *e, uint32_t slot) {
    if (e->ndone == e->donecap) {
        uint32_t cap = e->donecap ? e->donecap * 2 : 64;
        uint32_t *d = realloc(e->done, cap * sizeof(*d));
        if (d == NULL) {
            e->thread_errors++;
            return;  /* Python finds it on its next close() or at stop */
        }
        e->done = d;
        e->donecap = cap;
    }
    e->done[e->ndone++] = slot;
    e->pushed++;
}

/* End a live connection: reset (RST to both peers) or a plain close. A close
 * with bytes still pending, or of a dying connection, becomes a reset: a FIN
 * after a cut stream would look like a complete reply. */
void finish(Engine *e, conn_t *c, int reset) {
    if (c->state != LIVE)
        return;
    reset = reset || c->dead || c->w[0].pending || c->w[1].pending;
    for (int s = 0; s < 2; s++) {
        if (!reset)
            tls_close_notify(c->tls, s);
        if (reset) {
            struct linger lg = {1, 0};
            setsockopt(c->fd[s], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        }
        close(c->fd[s]);  /* also leaves the epoll set */
        c->fd[s] = -1;
        c->mask[s] = 0;
        c->reg[s] = 0;
    }
    release_way(e, &c->w[0], reset);
    release_way(e, &c->w[1], reset);
    if (c->fr != NULL) {
        free_framed(c->fr);
        c->fr = NULL;
    }
    if (c->nm != NULL) {
        nm_unref(c->nm);
        c->nm = NULL;
    }
    tls_free(c->tls);
    c->tls = NULL;
    c->state = DONE;
    c->reset = (uint8_t)reset;
    e->live--;
}

/* -- the loop --------------------------------------------------------------- */

/* A TLS leg's handshake, stepped by its socket's events; the relay starts once every
 * leg is done. A plain side's FIN meanwhile waits (its bytes are relayed after); an
 * error on it ends the connection. */
static void tls_step(Engine *e, conn_t *c, int s, uint32_t events) {
    if (!tls_on(c->tls, s) && (events & (EPOLLERR | EPOLLHUP))) {
        if (events & EPOLLERR)
            finish(e, c, 1);
        else
            c->deaf[s] = 1;
        return;
    }
    /* The handshake's public-key work (a millisecond or more with an RSA key) runs
     * outside the lock, so Python's calls -- add() on every accept, reap(), stats() --
     * never wait for it while holding the GIL. Only close() changes this connection
     * meanwhile, and it waits for the step (settled_conn() in engine.c). reap() may
     * empty the done list meanwhile: run() counts ends by e->pushed, not ndone. */
    c->stepping = 1;
    pthread_mutex_unlock(&e->lock);
    int r = tls_handshake(c->tls);
    pthread_mutex_lock(&e->lock);
    c->stepping = 0;
    if (r < 0) {
        e->tls_failures++;
        tls_note(&e->tlsbook, c->slot, c->tls);
        finish(e, c, 1);
    } else if (r > 0) {
        e->tls_handshakes++;
        e->tls_resumed += (uint64_t)(tls_resumed(c->tls, 0) + tls_resumed(c->tls, 1));
        if (tls_note_peers(&e->tlsbook, c->slot, c->tls))
            notify(e);
        c->w[0].watching = c->w[1].watching = 1;
        for (int i = 0; i < 2 && c->state == LIVE; i++)
            if (tls_pending(c->tls, i))
                readable(e, c, i);
    }
}

static void handle(Engine *e, uint32_t slot, int s, uint32_t events) {
    conn_t *c = e->conns[slot];
    int acted = 0;
    if (c->tls != NULL && tls_handshaking(c->tls)) {
        tls_step(e, c, s, events);
        goto done;
    }
    if (c->tls != NULL) {
        /* A record layer that waits on the socket the other way round (rare: TLS 1.3
         * key updates, alerts): the same socket's other readiness resumes it. */
        if ((events & EPOLLOUT) && tls_read_wants_out(c->tls, s) && c->w[s].watching) {
            readable(e, c, s);
            acted = 1;
        }
        if (c->state == LIVE && (events & EPOLLIN) && tls_write_wants_in(c->tls, s) &&
                c->w[1 - s].stalled) {
            writable(e, c, 1 - s);
            acted = 1;
        }
        if (c->state != LIVE)
            goto done;
    }
    /* fd[s] is the source of way s and the destination of way 1 - s. */
    if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && c->w[1 - s].stalled) {
        writable(e, c, 1 - s);
        acted = 1;
    }
    if (c->state == LIVE && (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && c->w[s].watching) {
        readable(e, c, s);
        acted = 1;
    }
    if (c->state == LIVE && !acted && (events & (EPOLLERR | EPOLLHUP))) {
        /* Nobody reads or writes this socket now. An error (an RST) or a hang-up with
         * the whole stream read means its peer is gone: lose() delivers what it sent
         * before, once its way is free to. A hang-up while its direction is stalled
         * must wait for the stall to end, or bytes the peer sent before its FIN would
         * be lost: take the socket out of the set till then; the same for the failed
         * side of a dying connection. */
        if (c->dead == 1 + s) {
            c->deaf[s] = 1;
        } else {
            int err = 0;
            socklen_t len = sizeof(err);
            getsockopt(c->fd[s], SOL_SOCKET, SO_ERROR, &err, &len);
            if ((events & EPOLLERR) || err || c->w[s].eof)
                lose(e, c, s);
            else
                c->deaf[s] = 1;
        }
    }
done:
    if (c->state == LIVE)
        rewatch(e, c, slot);
    if (c->state == DONE && !c->claimed)
        push_done(e, slot);
}

/* Reset the dying connections past their deadline (under the lock); whether any ended. */
static int sweep_dying(Engine *e) {
    double now = now_s();
    if (now < e->next_sweep)
        return 0;
    e->next_sweep = now + SWEEP_MS / 1e3;
    uint32_t keep = 0;
    uint64_t before = e->pushed;
    for (uint32_t k = 0; k < e->ndying; k++) {
        uint64_t t = e->dying[k];
        uint32_t slot = (uint32_t)(t & 0xffffffffu) >> 1;
        conn_t *c = slot < e->nconns ? e->conns[slot] : NULL;
        if (c == NULL || c->gen != (uint32_t)(t >> 32) || c->state != LIVE || !c->dead)
            continue;  /* ended already, or reused */
        if (now < c->deadline && c->w[c->dead - 1].eof)
            settle(e, c);  /* is the send queue empty now? */
        if (c->state == LIVE && now >= c->deadline)
            finish(e, c, 1);
        if (c->state != LIVE) {
            push_done(e, slot);
            continue;
        }
        e->dying[keep++] = t;
    }
    e->ndying = keep;
    return e->pushed != before;
}

void notify(Engine *e) {
    uint64_t one = 1;
    ssize_t r = write(e->notifyfd, &one, sizeof(one));
    (void)r;
}

void *run(void *arg) {
    Engine *e = arg;
    struct epoll_event evs[BATCH];
    double spin_until = 0;
    for (;;) {
        /* ndying is the thread's own: no lock to read it. */
        int n = epoll_wait(e->epfd, evs, BATCH,
                           spin_until > 0 ? 0 : (e->ndying ? SWEEP_MS : -1));
        if (n == 0 && e->ndying && now_s() >= e->next_sweep) {
            pthread_mutex_lock(&e->lock);
            int tell = sweep_dying(e);
            pthread_mutex_unlock(&e->lock);
            if (tell)
                notify(e);
        }
        if (n == 0) {
            /* busy_poll: after a batch, poll instead of sleeping for a while, so
             * the reply or next request due within microseconds is taken without a
             * wake-up from sleep, which costs tens of µs on a virtual CPU. Yielding
             * in between lets a runnable client or server have the CPU first. */
            if (now_s() >= spin_until)
                spin_until = 0;
            else
                sched_yield();
            continue;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            e->thread_errors++;
            break;
        }
        pthread_mutex_lock(&e->lock);
        if (e->stopping) {
            pthread_mutex_unlock(&e->lock);
            break;
        }
        uint64_t before = e->pushed;
        for (int k = 0; k < n; k++) {
            uint64_t t = evs[k].data.u64;
            if (t == WAKE_TAG)
                continue;
            uint32_t slot = (uint32_t)(t & 0xffffffffu) >> 1;
            int side = (int)(t & 1);
            uint32_t gen = (uint32_t)(t >> 32);
            if (slot >= e->nconns)
                continue;
            conn_t *c = e->conns[slot];
            if (c == NULL || c->gen != gen || c->state != LIVE)
                continue;  /* ended earlier in this batch, or reused */
            handle(e, slot, side, evs[k].events);
        }
        if (e->ndying)
            sweep_dying(e);
        int tell = e->pushed != before;
        double spin_us = e->busy_poll_us;
        pthread_mutex_unlock(&e->lock);
        /* A batch of many events means the load keeps the thread awake anyway;
         * spinning then only takes CPU from the clients and servers beside it. */
        if (spin_us > 0 && n <= SPIN_MAX_BATCH)
            spin_until = now_s() + spin_us / 1e6;
        else
            spin_until = 0;
        if (tell)
            notify(e);
    }
    return NULL;
}

#endif  /* __linux__ */
