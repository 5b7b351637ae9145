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
 * once under the engine's lock (Engine.close; after its TLS handshake step, if
 * one is under way: tls_step runs it outside the lock). Python reads byte
 * counters while a connection is live (Engine.counts); they are the only shared
 * words.
 *
 * The copy rules are the Python splice relay's (proxy/relay/pipes.py and
 * splice_way.py, measured there; docs/hot-loop.md): under copy: auto a direction
 * copies through the thread's scratch buffer while its reads are small and splices
 * through a pooled 1 MiB pipe once a read fills the buffer's bulk threshold; two
 * small spliced reads in a row go back to copying. A pipe is leased only while a
 * direction has bytes in it. When the kernel refuses a pipe, the direction copies.
 * Backpressure: while bytes wait for the destination, the source is not watched.
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
 *
 * This header is what the engine's files share (the framers know nothing of it):
 *
 *   engine.c         the Python type: Engine's methods under the GIL (add, close,
 *                    reap, counts, ...), the start and stop of the thread, the module
 *   engine_loop.c    the thread: the epoll loop, the epoll set (rewatch), the events
 *                    of a connection (handle), how a connection ends (half-close,
 *                    lose, settle, finish) and the sweep of the dying ones
 *   engine_pump.c    the byte pump: copy through the scratch buffer or splice through
 *                    a pooled pipe, backpressure, the pipe pool
 *   engine_framed.c  a framed (cluster) connection's way down: its framing state and
 *                    their pool, the frames Python rewrites and what the thread tells
 *                    it (the tells queue, Engine.asks / Engine.answer)
 *
 * Only the per-event helpers (now_s, tag, io_recv, io_send, stall, resume,
 * framing_busy) are static inline here; the rest costs one call across files, at
 * most a few per event.
 */
#ifndef CACHEPORT_ENGINE_H
#define CACHEPORT_ENGINE_H

#ifdef __linux__

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include "nodemap.h"
#include "resp_framer.h"
#include "tls_engine.h"

#define MODE_AUTO 0
#define MODE_SPLICE 1
#define MODE_BUFFER 2
#define MAX_BUSY_POLL_US 1000.0
#define WAKE_TAG UINT64_MAX

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
    uint8_t stepping;  /* the thread runs its TLS handshake outside the lock (tls_step) */
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
    uint64_t pushed;      /* connections ever put on the done list: a batch compares it,
                           * not ndone, which reap() may empty while a TLS step runs */
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

/* -- per-event helpers ------------------------------------------------------ */

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline uint64_t tag(uint32_t slot, uint32_t gen, int side) {
    return ((uint64_t)gen << 32) | ((uint64_t)slot << 1) | (uint64_t)side;
}

/* A side's bytes: through its TLS session where it has one, else the socket's. */
static inline ssize_t io_recv(conn_t *c, int s, char *buf, size_t len) {
    return tls_on(c->tls, s) ? tls_recv(c->tls, s, buf, len) : recv(c->fd[s], buf, len, 0);
}

static inline ssize_t io_send(conn_t *c, int s, const char *buf, size_t len) {
    return tls_on(c->tls, s) ? tls_send(c->tls, s, buf, len)
                             : send(c->fd[s], buf, len, MSG_NOSIGNAL);
}

static inline void stall(way_t *w) {
    w->watching = 0;
    w->stalled = 1;
}

static inline void resume(way_t *w) {
    w->stalled = 0;
    w->watching = !w->eof;
}

/* Way 1 of a framed connection has work besides its socket: a frame with Python, or
 * bytes read and not framed yet. */
static inline int framing_busy(conn_t *c, int i) {
    return i == 1 && c->fr != NULL &&
           (c->fr->waiting || c->fr->bat < c->fr->bend || c->fr->pre != NULL);
}

/* -- engine_loop.c ----------------------------------------------------------- */

void *run(void *arg);  /* the thread */
/* Bring the epoll set in line with what the directions wait for. */
void rewatch(Engine *e, conn_t *c, uint32_t slot);
/* Side s failed: cut the way into it, deliver what it sent, then reset. */
void lose(Engine *e, conn_t *c, int s);
/* A dying connection's failed side has delivered all: reset once the other's kernel
 * has sent it. */
void settle(Engine *e, conn_t *c);
/* Way i's source ended: an EOF (half-close) or an error (error != 0). */
void source_ended(Engine *e, conn_t *c, int i, int error);
/* End a live connection: reset, or a plain close where nothing is cut. */
void finish(Engine *e, conn_t *c, int reset);
void push_done(Engine *e, uint32_t slot);
void notify(Engine *e);  /* the event loop's eventfd: reap() or asks() has work */

/* -- engine_pump.c ----------------------------------------------------------- */

void readable(Engine *e, conn_t *c, int i);  /* way i's source can be read */
void writable(Engine *e, conn_t *c, int i);  /* way i's destination can take more */
/* Give back way w's pipe (to the pool, or closed if it may hold bytes) and held bytes. */
void release_way(Engine *e, way_t *w, int reset);

/* -- engine_framed.c --------------------------------------------------------- */

/* The framing state of a framed connection about to read: its own, or a parked one. */
framed_t *take_framing(Engine *e, conn_t *c);
void park_framing(Engine *e, conn_t *c);
void free_framed(framed_t *fr);
/* The way down of a framed connection: frame p[0:n] and send what the framer says. */
void pump_reply(Engine *e, conn_t *c, const char *p, size_t n);
PyObject *Engine_asks(Engine *e, PyObject *unused);
PyObject *Engine_answer(Engine *e, PyObject *args);

#endif  /* __linux__ */
#endif
