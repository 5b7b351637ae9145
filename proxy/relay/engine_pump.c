/* The engine's byte pump (engine.h): a direction copies through the thread's scratch
 * buffer, or splices through a pipe leased from the pool while its reads are large
 * (copy: auto; the rules are proxy/relay/pipes.py's, measured there). A short write
 * stalls the direction: its source is not read till the destination takes the rest. */
#ifdef __linux__

#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* -- pipes --------------------------------------------------------------- */

static int lease_pipe(Engine *e, way_t *w) {
    if (e->npipes) {
        e->npipes--;
        w->pipe_r = e->pipes[e->npipes][0];
        w->pipe_w = e->pipes[e->npipes][1];
        w->leases++;
        return 1;
    }
    if (e->pipes_live >= e->max_pipes) {
        e->pipe_busy++;
        return 0;
    }
    if (e->pipe_errno && now_s() - e->refused_at < e->refused_retry)
        return 0;
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
        e->pipe_errno = errno;
        e->refused_at = now_s();
        e->pipe_failures++;
        return 0;
    }
    int got = fcntl(p[1], F_SETPIPE_SZ, (int)e->pipe_size);
    if (got < 0 || (size_t)got < e->pipe_size) {
        e->pipe_errno = got < 0 ? errno : EPERM;
        e->refused_at = now_s();
        e->pipe_failures++;
        close(p[0]);
        close(p[1]);
        return 0;
    }
    e->pipe_errno = 0;
    e->pipes_live++;
    e->pipes_created++;
    w->pipe_r = p[0];
    w->pipe_w = p[1];
    w->leases++;
    return 1;
}

static void return_pipe(Engine *e, way_t *w) {
    /* The pool array has room for every live pipe (sized at max_pipes). */
    e->pipes[e->npipes][0] = w->pipe_r;
    e->pipes[e->npipes][1] = w->pipe_w;
    e->npipes++;
    w->pipe_r = w->pipe_w = -1;
}

static void discard_pipe(Engine *e, way_t *w) {
    close(w->pipe_r);
    close(w->pipe_w);
    e->pipes_live--;
    w->pipe_r = w->pipe_w = -1;
}


/* -- the ways --------------------------------------------------------------- */

/* Through the scratch buffer: small reads under auto, copy: buffer, or no pipe. */
static void copy_buffered(Engine *e, conn_t *c, int i) {
    way_t *w = &c->w[i];
    ssize_t n = io_recv(c, i, e->scratch, c->bufsize);
    if (n <= 0) {
        if (n == 0 || (errno != EAGAIN && errno != EINTR))
            source_ended(e, c, i, n < 0);
        return;
    }
    __atomic_store_n(&w->nbytes, w->nbytes + (uint64_t)n, __ATOMIC_RELAXED);
    w->copied += (uint64_t)n;
    if (c->nm != NULL) {
        framed_t *fr = take_framing(e, c);
        if (fr == NULL) {
            finish(e, c, 1);
            return;
        }
        if (i == 1) {
            pump_reply(e, c, e->scratch, (size_t)n);
            return;
        }
        rf_request(&fr->rf, e->scratch, (size_t)n);  /* noted before the node sees it */
    }
    if (c->mode == MODE_AUTO && (size_t)n >= c->bulk_at) {
        w->bulk = 1;  /* a full read: more is waiting, splice it */
        w->small = 0;
    }
    ssize_t m = io_send(c, 1 - i, e->scratch, (size_t)n);
    if (m < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            lose(e, c, 1 - i);
            return;
        }
        m = 0;
    }
    if (m < n) {
        w->held = malloc((size_t)(n - m));
        if (w->held == NULL) {
            finish(e, c, 1);
            return;
        }
        memcpy(w->held, e->scratch + m, (size_t)(n - m));
        w->held_at = 0;
        w->pending = (size_t)(n - m);
        stall(w);
    }
}

void readable(Engine *e, conn_t *c, int i) {
    way_t *w = &c->w[i];
    if (!w->bulk) {
        copy_buffered(e, c, i);
        /* Decrypted bytes can wait in the SSL with the socket empty: no event would come. */
        while (c->state == LIVE && w->watching && tls_pending(c->tls, i))
            copy_buffered(e, c, i);
        return;
    }
    if (w->pipe_r < 0 && !lease_pipe(e, w)) {
        copy_buffered(e, c, i);
        return;
    }
    ssize_t n = splice(c->fd[i], NULL, w->pipe_w, NULL, e->pipe_size,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n <= 0) {
        return_pipe(e, w);  /* still empty */
        if (n == 0 || (errno != EAGAIN && errno != EINTR))
            source_ended(e, c, i, n < 0);
        return;
    }
    __atomic_store_n(&w->nbytes, w->nbytes + (uint64_t)n, __ATOMIC_RELAXED);
    if (c->mode == MODE_AUTO && (size_t)n < c->bulk_at) {
        /* Not at the first small read: that is usually the tail of one large reply. */
        if (++w->small >= e->small_reads)
            w->bulk = 0;
    } else {
        w->small = 0;
    }
    ssize_t m = splice(w->pipe_r, NULL, c->fd[1 - i], NULL, (size_t)n,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (m < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            w->pending = (size_t)n;
            lose(e, c, 1 - i);
            return;
        }
        m = 0;
    }
    if (m == n) {
        return_pipe(e, w);
        return;
    }
    w->pending = (size_t)(n - m);
    stall(w);
}

static void after_drain(Engine *e, conn_t *c, int i);

void writable(Engine *e, conn_t *c, int i) {
    way_t *w = &c->w[i];
    ssize_t m;
    if (w->pipe_r >= 0) {
        m = splice(w->pipe_r, NULL, c->fd[1 - i], NULL, w->pending,
                   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    } else if (w->held != NULL) {
        m = io_send(c, 1 - i, w->held + w->held_at, w->pending);
    } else {
        resume(w);  /* nothing to send: a stale wake-up */
        after_drain(e, c, i);
        return;
    }
    if (m < 0) {
        if (errno != EAGAIN && errno != EINTR)
            lose(e, c, 1 - i);
        return;
    }
    w->pending -= (size_t)m;
    if (w->pipe_r < 0)
        w->held_at += (size_t)m;  /* a short send: the rest goes next time */
    if (w->pending)
        return;
    if (w->pipe_r >= 0) {
        return_pipe(e, w);
    } else {
        free(w->held);
        w->held = NULL;
        w->held_at = 0;
    }
    resume(w);
    after_drain(e, c, i);
}

/* Way i has sent all it held: a framed way down goes on with its backlog (unless it
 * waits for Python), then a dying connection may settle. */
static void after_drain(Engine *e, conn_t *c, int i) {
    way_t *w = &c->w[i];
    if (i == 1 && c->fr != NULL) {
        if (c->fr->waiting) {
            w->watching = 0;
            return;
        }
        if (c->fr->bat < c->fr->bend || c->fr->pre != NULL) {
            framed_t *fr = c->fr;
            pump_reply(e, c, fr->backlog ? fr->backlog + fr->bat : "", fr->bend - fr->bat);
            if (c->state != LIVE || w->pending || (c->fr != NULL && c->fr->waiting))
                return;
        } else {
            park_framing(e, c);
        }
    }
    if (c->dead == 1 + i && w->eof)
        settle(e, c);  /* the failed side's last bytes are out */
    else if (c->state == LIVE && w->watching && tls_pending(c->tls, i))
        readable(e, c, i);  /* what the SSL decrypted before the stall */
}

void release_way(Engine *e, way_t *w, int reset) {
    if (w->pipe_r >= 0) {
        if (w->pending || reset)
            discard_pipe(e, w);  /* may hold bytes: a pooled pipe must be empty */
        else
            return_pipe(e, w);
    }
    free(w->held);
    w->held = NULL;
    w->watching = w->stalled = 0;
}

#endif  /* __linux__ */
