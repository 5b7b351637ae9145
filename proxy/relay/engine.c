/* The native relay engine: one epoll thread per event loop moves the bytes of
 * plain TCP connections, so a request never wakes Python.
 *
 *   client --recv/splice--> [scratch | pipe] --send/splice--> upstream
 *   client <--send/splice-- [scratch | pipe] <--recv/splice-- upstream
 *
 * Python accepts, dials, and hands the two connected sockets over (Engine.add);
 * from then on this thread owns them: it relays, half-closes, resets, and closes
 * them. A connection the thread ends goes on a done list and an eventfd tells
 * the event loop, which reaps it (Engine.reap) and does the bookkeeping. A
 * connection Python ends (idle timeout, drain, node down, stop) is closed at
 * once under the engine's lock (Engine.close). Python reads byte counters
 * while a connection is live (Engine.counts); they are the only shared words.
 *
 * The copy rules are proxy/relay/splice.py's, measured there (docs/hot-loop.md):
 * under copy: auto a direction copies through the thread's scratch buffer while
 * its reads are small and splices through a pooled 1 MiB pipe once a read
 * fills the buffer's bulk threshold; two small spliced reads in a row go back
 * to copying. A pipe is leased only while a direction has bytes in it. When
 * the kernel refuses a pipe, the direction copies. Backpressure: while bytes
 * wait for the destination, the source is not watched.
 *
 * When a side fails (an RST, a write that errs), the way into it is cut, and the
 * way out of it still delivers what that side sent before -- its socket's receive
 * queue is final -- then the connection resets (lose()). A peer that stops reading
 * gets drain_grace seconds for that, no more: the thread sweeps the dying
 * connections while there are any (issue 33; docs/hot-loop.md).
 *
 * Every descriptor is level-triggered and watched only for what some direction
 * waits for. A socket nobody waits on stays in the set with an empty mask, so an
 * RST still arrives as EPOLLERR and ends the connection; a hang-up nobody can act
 * on yet takes it out of the set until its direction can read again (handle()).
 *
 * No Python object is touched outside the GIL-holding entry points, and the
 * thread never takes the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Built twice (pyproject.toml): proxy.relay._engine, and with -DCACHEPORT_TLS and libssl
 * proxy.relay._engine_tls, which also relays TLS legs (tls_engine.c). Where libssl's
 * headers are missing only the first builds, and TLS listeners use the Python relay. */
#ifdef CACHEPORT_TLS
#define ENGINE_MODULE "proxy.relay._engine_tls"
#define ENGINE_INIT PyInit__engine_tls
#else
#define ENGINE_MODULE "proxy.relay._engine"
#define ENGINE_INIT PyInit__engine
#endif

#ifdef __linux__

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "framer_py.h"
#include "nodemap.h"
#include "resp_framer.h"
#include "tls_engine.h"

#define MODE_AUTO 0
#define MODE_SPLICE 1
#define MODE_BUFFER 2

#define BATCH 128       /* events per epoll_wait */
#define MAX_BUSY_POLL_US 1000.0
#define SPIN_MAX_BATCH 2 /* busy_poll only after a batch this small: a larger one means load */
#define WAKE_TAG UINT64_MAX
#define SWEEP_MS 10      /* how often dying connections are checked: deadline, send queue */

enum { FREE = 0, LIVE = 1, DONE = 2 };

typedef struct {
    uint64_t nbytes;   /* read from src; read by Python without the lock */
    size_t pending;    /* bytes read and not yet taken by dst */
    char *held;        /* copy path: the unsent tail, allocated only when a send is short */
    size_t held_at;
    int pipe_r, pipe_w;
    uint64_t copied;   /* bytes that went through the scratch buffer (test seam) */
    uint32_t leases;   /* pipes taken (a test seam: proves the splice path runs) */
    uint8_t eof, watching, stalled, bulk, small;
} way_t;

/* A cluster connection's framing (resp_framer.h). The way down (upstream -> client)
 * frames every chunk; what it read and has not framed yet waits in the backlog while a
 * send is short or Python rewrites a frame (an ask). A connection holds one only while
 * its conversation is not a fresh one's: an idle framed connection parks it in the
 * thread's pool (park_framing), so it costs no more than a plain one. */
typedef struct {
    rf_t rf;
    char *backlog;
    size_t bat, bend;   /* backlog[bat:bend] still to frame */
    char *ask;          /* the frame Python is to rewrite, till asks() takes it */
    size_t asklen;
    uint8_t *spec;
    size_t speclen;
    uint8_t askkind, waiting;  /* waiting: the way down waits for answer() */
    char *pre;          /* Python's answer, sent in one write with what follows it */
    size_t prelen;
} framed_t;

#define FPOOL_MAX 64     /* parked framing states kept per thread */

typedef struct {
    int fd[2];         /* 0: client, 1: upstream; way i reads fd[i] and writes fd[1 - i] */
    uint32_t mask[2];  /* what epoll watches on each now */
    uint8_t reg[2];    /* in the epoll set */
    uint8_t deaf[2];   /* out of it: a HUP came that no direction can act on yet */
    way_t w[2];
    uint32_t gen;
    uint32_t bufsize;  /* copy-path read size: the listener's buffer_size */
    uint32_t bulk_at;  /* copy: auto -- reads at or over this switch to pipes */
    uint32_t slot;
    double deadline;   /* dying: reset by then whatever is left */
    uint8_t state, mode, reset, claimed;
    uint8_t dead;      /* 0, or 1 + the side that failed: the connection is dying */
    uint8_t broken;    /* the upstream broke the protocol (framed connections) */
    uint8_t first;     /* who ended first, for the connection log: 1 + side at an EOF,
                        * 3 + side at a failure, 0 not yet (reap() reports it) */
    nodemap_t *nm;     /* a framed (Redis Cluster) connection's node map; NULL: plain */
    framed_t *fr;      /* its framing state while the conversation is not a fresh one's */
    tls_conn_t *tls;   /* TLS on either leg (tls_engine.h); NULL: plain */
} conn_t;

/* What the thread tells Python about framed connections besides their end (asks()). */
enum { TELL_REDIRECTS = 0, TELL_BROKEN = 4 };  /* 1..3: RF_ASK_* */
typedef struct {
    uint64_t tag;
    uint8_t kind;
} tell_t;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_t thread;
    int inited, started, stopping, closed;
    int epfd, wakefd, notifyfd;
    conn_t **conns;
    uint32_t nconns, cap;
    uint32_t *freelist;
    uint32_t nfree;
    uint32_t *done;
    uint32_t ndone, donecap;
    uint64_t *dying;      /* tag(slot, gen, 0) of dying connections; only the thread writes */
    uint32_t ndying, dyingcap;
    double drain_grace;   /* seconds a dying connection may take to deliver what is left */
    double next_sweep;
    uint32_t live;
    /* the pipe pool */
    int (*pipes)[2];
    uint32_t npipes;      /* free, in pipes[] */
    uint32_t pipes_live;  /* leased + free */
    uint32_t max_pipes;
    size_t pipe_size;
    uint64_t pipes_created, pipe_failures, pipe_busy;
    double refused_at;
    double refused_retry; /* seconds before asking the kernel again after a refusal */
    uint8_t small_reads;  /* small spliced reads in a row that end a bulk phase */
    int pipe_errno;       /* last refusal; 0 when none */
    int pipe_warned;
    char *scratch;
    size_t scratch_size;
    uint64_t thread_errors;
    double busy_poll_us;  /* after a batch, poll without sleeping this long (0: never) */
    tell_t *tells;        /* for asks(): frames to rewrite, redirects, broken streams */
    uint32_t ntells, tellcap;
    uint64_t protocol_errors;
    framed_t **fpool;     /* parked framing states, for connections that become busy */
    uint32_t nfpool;
    tls_book_t *tlsbook;  /* handshake outcomes till Python takes them (tls_events()) */
    uint64_t tls_handshakes, tls_resumed, tls_failures;
} Engine;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t tag(uint32_t slot, uint32_t gen, int side) {
    return ((uint64_t)gen << 32) | ((uint64_t)slot << 1) | (uint64_t)side;
}

/* A side's bytes: through its TLS session where it has one, else the socket's. */
static ssize_t io_recv(conn_t *c, int s, char *buf, size_t len) {
    return tls_on(c->tls, s) ? tls_recv(c->tls, s, buf, len) : recv(c->fd[s], buf, len, 0);
}

static ssize_t io_send(conn_t *c, int s, const char *buf, size_t len) {
    return tls_on(c->tls, s) ? tls_send(c->tls, s, buf, len)
                             : send(c->fd[s], buf, len, MSG_NOSIGNAL);
}

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

/* -- connections ---------------------------------------------------------- */

static void finish(Engine *e, conn_t *c, int reset);
static void notify(Engine *e);

static void free_framed(framed_t *fr) {
    rf_free(&fr->rf);
    free(fr->backlog);
    free(fr->ask);
    free(fr->spec);
    free(fr->pre);
    free(fr);
}

/* The framing state of a framed connection about to read: its own, or a parked one. */
static framed_t *take_framing(Engine *e, conn_t *c) {
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
static void park_framing(Engine *e, conn_t *c) {
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

/* Way 1 of a framed connection has work besides its socket: a frame with Python, or
 * bytes read and not framed yet. */
static int framing_busy(conn_t *c, int i) {
    return i == 1 && c->fr != NULL &&
           (c->fr->waiting || c->fr->bat < c->fr->bend || c->fr->pre != NULL);
}

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

/* Bring the epoll set in line with what the directions wait for. A socket stays
 * registered with an empty mask while nobody waits on it, so an RST still arrives
 * as EPOLLERR; only a HUP nobody can act on makes it deaf (handle()). */
static void rewatch(Engine *e, conn_t *c, uint32_t slot) {
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

static void lose(Engine *e, conn_t *c, int s);
static void release_way(Engine *e, way_t *w, int reset);

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
static void settle(Engine *e, conn_t *c) {
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
static void lose(Engine *e, conn_t *c, int s) {
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
static void source_ended(Engine *e, conn_t *c, int i, int error) {
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

static void pump_reply(Engine *e, conn_t *c, const char *p, size_t n);

static void stall(way_t *w) {
    w->watching = 0;
    w->stalled = 1;
}

static void resume(way_t *w) {
    w->stalled = 0;
    w->watching = !w->eof;
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
static void pump_reply(Engine *e, conn_t *c, const char *p, size_t n) {
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

static void readable(Engine *e, conn_t *c, int i) {
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

static void writable(Engine *e, conn_t *c, int i) {
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

static void release_way(Engine *e, way_t *w, int reset) {
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

static void push_done(Engine *e, uint32_t slot) {
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
}

/* End a live connection: reset (RST to both peers) or a plain close. A close
 * with bytes still pending, or of a dying connection, becomes a reset: a FIN
 * after a cut stream would look like a complete reply. */
static void finish(Engine *e, conn_t *c, int reset) {
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
    int r = tls_handshake(c->tls);
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
    uint32_t keep = 0, before = e->ndone;
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
    return e->ndone > before;
}

static void notify(Engine *e) {
    uint64_t one = 1;
    ssize_t r = write(e->notifyfd, &one, sizeof(one));
    (void)r;
}

static void *run(void *arg) {
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
        uint32_t before = e->ndone;
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
        int tell = e->ndone > before;
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

/* -- Python entry points -------------------------------------------------- */

static int start_thread(Engine *e) {
    if (e->started)
        return 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    /* The thread must not take signals meant for the main thread (SIGTERM, SIGHUP). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&e->thread, &attr, run, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    e->started = 1;
    return 0;
}

static void stop_engine(Engine *e) {
    if (e->closed)
        return;
    e->closed = 1;
    if (e->started) {
        pthread_mutex_lock(&e->lock);
        e->stopping = 1;
        pthread_mutex_unlock(&e->lock);
        uint64_t one = 1;
        ssize_t r = write(e->wakefd, &one, sizeof(one));
        (void)r;
        Py_BEGIN_ALLOW_THREADS
        pthread_join(e->thread, NULL);
        Py_END_ALLOW_THREADS
        e->started = 0;
    }
    for (uint32_t i = 0; i < e->nconns; i++) {
        conn_t *c = e->conns[i];
        if (c == NULL)
            continue;
        if (c->state == LIVE) {
            c->claimed = 1;
            finish(e, c, 1);
        }
        free(c);
        e->conns[i] = NULL;
    }
    for (uint32_t i = 0; i < e->npipes; i++) {
        close(e->pipes[i][0]);
        close(e->pipes[i][1]);
    }
    e->npipes = 0;
    if (e->epfd >= 0) close(e->epfd);
    if (e->wakefd >= 0) close(e->wakefd);
    if (e->notifyfd >= 0) close(e->notifyfd);
    e->epfd = e->wakefd = e->notifyfd = -1;
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kw) {
    /* The defaults are proxy/relay/splice.py's; proxy/native.py passes them from there. */
    static char *names[] = {"pipe_size", "max_pipes", "scratch_size", "small_reads",
                            "refused_retry", "busy_poll_us", "drain_grace", NULL};
    Py_ssize_t pipe_size = 1 << 20, max_pipes = 64, scratch = 256 << 10, small_reads = 2;
    double refused_retry = 5.0, busy_poll_us = 0, drain_grace = 2.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|nnnnddd", names, &pipe_size, &max_pipes,
                                     &scratch, &small_reads, &refused_retry, &busy_poll_us,
                                     &drain_grace))
        return -1;
    if (pipe_size < 4096 || max_pipes < 0 || scratch < 4096 || small_reads < 1 ||
            small_reads > 255 || refused_retry < 0 ||
            !(busy_poll_us >= 0 && busy_poll_us <= MAX_BUSY_POLL_US) || !(drain_grace >= 0)) {
        PyErr_SetString(PyExc_ValueError, "pipe_size and scratch_size >= 4096, max_pipes >= 0, "
                        "1 <= small_reads <= 255, refused_retry >= 0, "
                        "0 <= busy_poll_us <= 1000, drain_grace >= 0");
        return -1;
    }
    if (e->inited) {
        PyErr_SetString(PyExc_RuntimeError, "Engine initialised twice");
        return -1;
    }
    pthread_mutex_init(&e->lock, NULL);
    e->inited = 1;
    e->epfd = e->wakefd = e->notifyfd = -1;
    e->pipe_size = (size_t)pipe_size;
    e->small_reads = (uint8_t)small_reads;
    e->refused_retry = refused_retry;
    e->busy_poll_us = busy_poll_us;
    e->drain_grace = drain_grace;
    e->max_pipes = (uint32_t)max_pipes;
    e->scratch_size = (size_t)scratch;
    e->scratch = malloc(e->scratch_size);
    e->pipes = calloc(e->max_pipes ? e->max_pipes : 1, sizeof(*e->pipes));
    if (e->scratch == NULL || e->pipes == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->notifyfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->epfd < 0 || e->wakefd < 0 || e->notifyfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_TAG};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wakefd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (e != NULL)
        e->epfd = e->wakefd = e->notifyfd = -1;
    return (PyObject *)e;
}

static void Engine_dealloc(Engine *e) {
    stop_engine(e);
    free(e->conns);
    free(e->freelist);
    free(e->done);
    free(e->dying);
    free(e->tells);
    for (uint32_t i = 0; i < e->nfpool; i++)
        free_framed(e->fpool[i]);
    free(e->fpool);
    tls_book_free(&e->tlsbook);
    free(e->pipes);
    free(e->scratch);
    if (e->inited)
        pthread_mutex_destroy(&e->lock);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int check_open(Engine *e) {
    if (e->closed || e->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "engine is closed");
        return -1;
    }
    return 0;
}

static conn_t *slot_conn(Engine *e, Py_ssize_t slot) {
    if (slot < 0 || (size_t)slot >= e->nconns || e->conns[slot] == NULL ||
            e->conns[slot]->state == FREE) {
        PyErr_SetString(PyExc_KeyError, "no such connection");
        return NULL;
    }
    return e->conns[slot];
}

static void refuse_fds(int cfd, int ufd) {
    struct linger lg = {1, 0};
    setsockopt(cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    setsockopt(ufd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(cfd);
    close(ufd);
}

/* add(client_fd, upstream_fd, mode, bufsize, bulk_at, nodemap=None, tls=None) -> slot.
 * The engine owns both descriptors from here on, also when it raises: then it has reset
 * and closed them. With a NodeMap the connection is a Redis Cluster one: its replies are
 * framed (resp_framer.h), and it always copies (a framer must see every byte). With tls
 * (tls_engine.h: the SSL contexts, the name to verify) a leg or both speak TLS: the
 * thread handshakes first, then copies. */
static PyObject *Engine_add(Engine *e, PyObject *args) {
    int cfd, ufd, mode;
    unsigned int bufsize, bulk_at;
    PyObject *map = Py_None, *tlsspec = Py_None;
    if (!PyArg_ParseTuple(args, "iiiII|OO", &cfd, &ufd, &mode, &bufsize, &bulk_at, &map,
                          &tlsspec))
        return NULL;
    if (mode < MODE_AUTO || mode > MODE_BUFFER || bufsize == 0) {
        refuse_fds(cfd, ufd);
        PyErr_SetString(PyExc_ValueError, "bad mode or bufsize");
        return NULL;
    }
    nodemap_t *nm = NULL;
    if (map != Py_None) {
        nm = framer_py_nodemap(map);
        if (nm == NULL) {
            refuse_fds(cfd, ufd);
            return NULL;
        }
        nm_ref(nm);
        mode = MODE_BUFFER;
    }
    tls_conn_t *tls = NULL;
    if (tlsspec != Py_None) {
        if (nm != NULL) {
            PyErr_SetString(PyExc_ValueError, "a framed connection cannot have TLS here");
        } else if ((tls = tls_conn_new(tlsspec, cfd, ufd)) != NULL) {
            mode = MODE_BUFFER;  /* records are encrypted in userspace: nothing to splice */
        }
        if (tls == NULL) {
            nm_unref(nm);
            refuse_fds(cfd, ufd);
            return NULL;
        }
    }
    if (check_open(e) < 0 || start_thread(e) < 0) {
        tls_free(tls);
        nm_unref(nm);
        refuse_fds(cfd, ufd);
        return NULL;
    }
    if (bufsize > e->scratch_size)
        bufsize = (unsigned int)e->scratch_size;
    pthread_mutex_lock(&e->lock);
    uint32_t slot;
    conn_t *c;
    if (e->nfree) {
        slot = e->freelist[--e->nfree];
        c = e->conns[slot];
    } else {
        if (e->nconns == e->cap) {
            uint32_t cap = e->cap ? e->cap * 2 : 256;
            conn_t **cs = realloc(e->conns, cap * sizeof(*cs));
            uint32_t *fl = cs ? realloc(e->freelist, cap * sizeof(*fl)) : NULL;
            if (cs) e->conns = cs;
            if (fl) e->freelist = fl;
            if (cs == NULL || fl == NULL) {
                pthread_mutex_unlock(&e->lock);
                tls_free(tls);
                nm_unref(nm);
                refuse_fds(cfd, ufd);
                return PyErr_NoMemory();
            }
            e->cap = cap;
        }
        c = calloc(1, sizeof(*c));
        if (c == NULL) {
            pthread_mutex_unlock(&e->lock);
            tls_free(tls);
            nm_unref(nm);
            refuse_fds(cfd, ufd);
            return PyErr_NoMemory();
        }
        slot = e->nconns++;
        e->conns[slot] = c;
    }
    uint32_t gen = c->gen + 1;
    memset(c, 0, sizeof(*c));
    c->gen = gen;
    c->slot = slot;
    c->fd[0] = cfd;
    c->fd[1] = ufd;
    c->mode = (uint8_t)mode;
    c->nm = nm;
    c->bufsize = bufsize;
    c->bulk_at = bulk_at < bufsize ? bulk_at : bufsize;
    c->tls = tls;
    for (int i = 0; i < 2; i++) {
        c->w[i].pipe_r = c->w[i].pipe_w = -1;
        c->w[i].bulk = mode == MODE_SPLICE;
        c->w[i].watching = tls == NULL;  /* TLS: the handshake first (tls_step()) */
    }
    c->state = LIVE;
    e->live++;
    rewatch(e, c, slot);
    if (c->state != LIVE) {
        /* epoll refused a descriptor: finish() has reset and closed both. */
        c->state = FREE;
        e->freelist[e->nfree++] = slot;
        pthread_mutex_unlock(&e->lock);
        PyErr_SetString(PyExc_OSError, "epoll_ctl refused a socket");
        return NULL;
    }
    pthread_mutex_unlock(&e->lock);
    return PyLong_FromUnsignedLong(slot);
}

static void free_slot(Engine *e, uint32_t slot) {
    e->conns[slot]->state = FREE;
    e->freelist[e->nfree++] = slot;
}

/* close(slot, reset) -> (up, down, reset): Python ends a connection now. */
static PyObject *Engine_close(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    int reset;
    if (!PyArg_ParseTuple(args, "np", &slot, &reset))
        return NULL;
    pthread_mutex_lock(&e->lock);
    conn_t *c = slot_conn(e, slot);
    if (c == NULL) {
        pthread_mutex_unlock(&e->lock);
        return NULL;
    }
    if (c->state == LIVE) {
        finish(e, c, reset);
        free_slot(e, (uint32_t)slot);
    } else {
        c->claimed = 1;  /* on the done list: reap() frees it */
    }
    PyObject *r = Py_BuildValue("KKi", (unsigned long long)c->w[0].nbytes,
                                (unsigned long long)c->w[1].nbytes, (int)c->reset);
    pthread_mutex_unlock(&e->lock);
    return r;
}

/* reap() -> [(slot, up, down, reset, first)] for connections the thread ended. */
static PyObject *Engine_reap(Engine *e, PyObject *unused) {
    uint64_t count;
    if (e->notifyfd >= 0) {
        ssize_t r = read(e->notifyfd, &count, sizeof(count));
        (void)r;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    pthread_mutex_lock(&e->lock);
    for (uint32_t k = 0; k < e->ndone; k++) {
        uint32_t slot = e->done[k];
        conn_t *c = e->conns[slot];
        if (!c->claimed) {
            PyObject *t = Py_BuildValue("IKKii", slot, (unsigned long long)c->w[0].nbytes,
                                        (unsigned long long)c->w[1].nbytes, (int)c->reset,
                                        (int)c->first);
            if (t == NULL || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                /* Keep the rest for the next reap. */
                memmove(e->done, e->done + k, (e->ndone - k) * sizeof(*e->done));
                e->ndone -= k;
                pthread_mutex_unlock(&e->lock);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(t);
        }
        free_slot(e, slot);
    }
    e->ndone = 0;
    pthread_mutex_unlock(&e->lock);
    return out;
}

/* asks() -> [(slot, kind, frame, spec)] what framed connections need from Python:
 * kind 1..3 a whole frame to rewrite (resp_framer.h RF_ASK_*; answer() with the bytes
 * to send instead), 0 a redirect the thread rewrote (frame: 1), 4 the node broke the
 * protocol (the connection is closed). */
static PyObject *Engine_asks(Engine *e, PyObject *unused) {
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
static PyObject *Engine_answer(Engine *e, PyObject *args) {
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

/* counts(slot) -> (up, down, pending_down): relaxed reads, no lock. */
static PyObject *Engine_counts(Engine *e, PyObject *arg) {
    Py_ssize_t slot = PyLong_AsSsize_t(arg);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || (size_t)slot >= e->nconns || e->conns[slot] == NULL) {
        PyErr_SetString(PyExc_KeyError, "no such connection");
        return NULL;
    }
    conn_t *c = e->conns[slot];
    return Py_BuildValue("KKn",
                         (unsigned long long)__atomic_load_n(&c->w[0].nbytes, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&c->w[1].nbytes, __ATOMIC_RELAXED),
                         (Py_ssize_t)__atomic_load_n(&c->w[1].pending, __ATOMIC_RELAXED));
}

/* detail(slot) -> dict: fds, leases, modes; for tests and /status, under the lock. */
static PyObject *Engine_detail(Engine *e, PyObject *arg) {
    Py_ssize_t slot = PyLong_AsSsize_t(arg);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&e->lock);
    conn_t *c = slot_conn(e, slot);
    if (c == NULL) {
        pthread_mutex_unlock(&e->lock);
        return NULL;
    }
    PyObject *d = Py_BuildValue(
        "{s:i,s:i,s:I,s:I,s:K,s:K,s:i,s:i,s:i,s:i,s:n,s:n,s:i,s:i}",
        "client_fd", c->fd[0], "upstream_fd", c->fd[1],
        "leases_up", c->w[0].leases, "leases_down", c->w[1].leases,
        "copied_up", (unsigned long long)c->w[0].copied,
        "copied_down", (unsigned long long)c->w[1].copied,
        "bulk_up", (int)c->w[0].bulk, "bulk_down", (int)c->w[1].bulk,
        "eof_up", (int)c->w[0].eof, "eof_down", (int)c->w[1].eof,
        "pending_up", (Py_ssize_t)c->w[0].pending, "pending_down", (Py_ssize_t)c->w[1].pending,
        "framed", c->nm != NULL, "framing_held", c->fr != NULL);
    pthread_mutex_unlock(&e->lock);
    return d;
}

static PyObject *Engine_stats(Engine *e, PyObject *unused) {
    pthread_mutex_lock(&e->lock);
    PyObject *d = Py_BuildValue(
        "{s:I,s:I,s:I,s:K,s:K,s:K,s:i,s:K,s:n,s:K}",
        "live", e->live, "pipes_live", e->pipes_live, "pipes_free", e->npipes,
        "pipes_created", (unsigned long long)e->pipes_created,
        "pipe_failures", (unsigned long long)e->pipe_failures,
        "pipe_busy", (unsigned long long)e->pipe_busy,
        "pipe_errno", e->pipe_errno,
        "thread_errors", (unsigned long long)e->thread_errors,
        "pipe_size", (Py_ssize_t)e->pipe_size,
        "protocol_errors", (unsigned long long)e->protocol_errors);
    if (d != NULL) {
        const char *keys[] = {"tls_handshakes", "tls_resumed", "tls_failures"};
        uint64_t vals[] = {e->tls_handshakes, e->tls_resumed, e->tls_failures};
        for (int k = 0; k < 3; k++) {
            PyObject *v = PyLong_FromUnsignedLongLong(vals[k]);
            if (v == NULL || PyDict_SetItemString(d, keys[k], v) < 0) {
                Py_XDECREF(v);
                Py_CLEAR(d);
                break;
            }
            Py_DECREF(v);
        }
    }
    pthread_mutex_unlock(&e->lock);
    return d;
}

/* tls_events() -> [(slot, side, reason, not_after)] since the last call: a handshake that
 * failed (reason; its connection is, or will be, on the done list), or a leg's peer
 * certificate (reason None, its notAfter in Unix time). */
static PyObject *Engine_tls_events(Engine *e, PyObject *unused) {
    pthread_mutex_lock(&e->lock);
    PyObject *out = tls_take(&e->tlsbook);
    pthread_mutex_unlock(&e->lock);
    return out;
}

/* handshaking(slot) -> bool: a TLS leg of this live connection has not finished its
 * handshake (Python ends it at connect_timeout). */
static PyObject *Engine_handshaking(Engine *e, PyObject *arg) {
    Py_ssize_t slot = PyLong_AsSsize_t(arg);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&e->lock);
    conn_t *c = slot_conn(e, slot);
    int busy = c != NULL && c->state == LIVE && c->tls != NULL && tls_handshaking(c->tls);
    pthread_mutex_unlock(&e->lock);
    if (c == NULL)
        return NULL;
    return PyBool_FromLong(busy);
}

/* trim_pipes(): close the pooled (empty) pipes; an idle engine gives back kernel memory. */
static PyObject *Engine_trim_pipes(Engine *e, PyObject *unused) {
    pthread_mutex_lock(&e->lock);
    for (uint32_t i = 0; i < e->npipes; i++) {
        close(e->pipes[i][0]);
        close(e->pipes[i][1]);
        e->pipes_live--;
    }
    e->npipes = 0;
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *e, PyObject *unused) {
    stop_engine(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_notify_fd(Engine *e, void *closure) {
    return PyLong_FromLong(e->notifyfd);
}

static PyObject *Engine_closed(Engine *e, void *closure) {
    return PyBool_FromLong(e->closed);
}

static PyObject *Engine_get_busy_poll(Engine *e, void *closure) {
    pthread_mutex_lock(&e->lock);
    double us = e->busy_poll_us;
    pthread_mutex_unlock(&e->lock);
    return PyFloat_FromDouble(us);
}

/* A reload changes it on live engines: the thread reads it after each batch. */
static int Engine_set_busy_poll(Engine *e, PyObject *value, void *closure) {
    double us = value ? PyFloat_AsDouble(value) : -1.0;
    if (us == -1.0 && PyErr_Occurred())
        return -1;
    if (!(us >= 0 && us <= MAX_BUSY_POLL_US)) {
        PyErr_SetString(PyExc_ValueError, "0 <= busy_poll_us <= 1000");
        return -1;
    }
    pthread_mutex_lock(&e->lock);
    e->busy_poll_us = us;
    pthread_mutex_unlock(&e->lock);
    return 0;
}

static PyMethodDef Engine_methods[] = {
    {"add", (PyCFunction)Engine_add, METH_VARARGS, "Hand over two connected sockets."},
    {"close", (PyCFunction)Engine_close, METH_VARARGS, "End a connection now."},
    {"reap", (PyCFunction)Engine_reap, METH_NOARGS, "Connections the thread ended."},
    {"counts", (PyCFunction)Engine_counts, METH_O, "Byte counters of a connection."},
    {"asks", (PyCFunction)Engine_asks, METH_NOARGS, "What framed connections need."},
    {"answer", (PyCFunction)Engine_answer, METH_VARARGS, "Bytes in place of an asked frame."},
    {"detail", (PyCFunction)Engine_detail, METH_O, "A connection's state (tests)."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Engine-wide counters."},
    {"trim_pipes", (PyCFunction)Engine_trim_pipes, METH_NOARGS, "Close pooled pipes."},
    {"tls_events", (PyCFunction)Engine_tls_events, METH_NOARGS, "Handshake outcomes."},
    {"handshaking", (PyCFunction)Engine_handshaking, METH_O, "A TLS leg still handshakes."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, "Reset every connection; end the thread."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"notify_fd", (getter)Engine_notify_fd, NULL, "Readable when reap() has work.", NULL},
    {"closed", (getter)Engine_closed, NULL, "Whether stop() ran.", NULL},
    {"busy_poll_us", (getter)Engine_get_busy_poll, (setter)Engine_set_busy_poll,
     "How long the thread polls without sleeping after a batch (0: never).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = ENGINE_MODULE ".Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native relay engine: an epoll thread that owns the sockets handed to it.",
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, ENGINE_MODULE,
    "The native relay engine (Linux): see proxy/native.py.", -1, NULL,
};

PyMODINIT_FUNC ENGINE_INIT(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    if (framer_py_add(m) < 0 || tls_module_add(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MODE_AUTO", MODE_AUTO);
    PyModule_AddIntConstant(m, "MODE_SPLICE", MODE_SPLICE);
    PyModule_AddIntConstant(m, "MODE_BUFFER", MODE_BUFFER);
    return m;
}

#else  /* not Linux: the module imports and says so; proxy/native.py falls back */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, ENGINE_MODULE, "Not built: needs Linux (epoll, splice).", -1, NULL,
};

PyMODINIT_FUNC ENGINE_INIT(void) {
    PyErr_SetString(PyExc_ImportError, ENGINE_MODULE " needs Linux");
    return NULL;
}

#endif
