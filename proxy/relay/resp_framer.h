/* The RESP framer of a Redis Cluster connection: bytes in, decisions out.
 *
 *   client bytes --rf_request--> commands noted (the bytes go on unchanged)
 *   node bytes   --rf_reply----> forward n bytes | emit these bytes instead |
 *                                ask Python about this whole frame | close
 *
 * A C port of proxy/protocols/resp (Scanner, RequestParser, Conversation) and of
 * ClusterRewriter.feed_reply's driver: replies are framed and matched to their
 * commands, never searched, and bulk payloads are skipped by length. A top-level
 * -MOVED/-ASK whose host the node map knows is rewritten here; the replies whose
 * answers list nodes (CLUSTER SLOTS/SHARDS/NODES/REPLICAS, also inside EXEC) and
 * redirects the map cannot answer are handed whole to Python's rewriters, which are
 * the reference (tests/test_framer_fuzz.py compares the two on random streams).
 * It knows nothing of sockets or of the engine. */
#ifndef CACHEPORT_RESP_FRAMER_H
#define CACHEPORT_RESP_FRAMER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define RF_MAX_LINE (1 << 20)          /* proxy/protocols/resp MAX_LINE */
#define RF_MAX_INLINE (64 * 1024)      /* MAX_INLINE */
#define RF_MAX_BULK (512LL << 20)      /* MAX_BULK */
#define RF_MAX_DEPTH 65536             /* nesting beyond this is a broken stream */
#define RF_MAX_HOLD ((512LL << 20) + (1 << 20))  /* a held frame: proto-max-bulk-len + 1 MiB */
#define RF_ARG 16                      /* bytes of a captured name/argument kept */

/* What Python applies to a whole frame (RF_ASK). 4 is the engine's (a broken stream);
 * RF_ASK_MC: a Memcached auto-discovery unit (mc_framer.h). */
enum { RF_ASK_CLUSTER = 1, RF_ASK_EXEC = 2, RF_ASK_REDIRECT = 3, RF_ASK_MC = 5 };
/* Which CLUSTER subcommand's rewriter (proxy/protocols/redis_cluster REWRITERS). */
enum { RW_NONE = 0, RW_SLOTS = 1, RW_SHARDS = 2, RW_NODES = 3, RW_REPLICAS = 4 };

enum rf_action {
    RF_DONE = 0,   /* forward `fwd` bytes; the rest of the input is consumed (maybe held) */
    RF_EMIT,       /* forward `fwd` bytes, then data/len; call again with the rest */
    RF_ASK,        /* forward `fwd` bytes, then Python rewrites frame data/len; then the rest */
    RF_ERROR,      /* the node broke the protocol: close both sides */
};

/* Looks an internal host:port up; writes "announce:port" to out and returns its length,
 * or -1 when the node is not mapped. */
typedef int (*rf_lookup_fn)(void *ctx, const char *host, size_t hlen, unsigned port,
                            char *out, size_t cap);

typedef struct {
    int64_t skip;       /* payload bytes (with CRLF) left */
    int64_t *stack;     /* open aggregates; Scanner's encoding */
    uint32_t depth, cap;
    char *line;         /* a header line cut by the end of a chunk */
    uint32_t linelen, linecap;
    uint8_t stream;
} rf_scan_t;

typedef struct {        /* a run of pending commands with the same meaning */
    uint8_t kind, id, sub, pad;
    uint32_t argc;
    uint32_t count;
} rf_cmd_t;

typedef struct {        /* a ring of runs */
    rf_cmd_t *v;
    uint32_t head, len, cap;
} rf_queue_t;

typedef struct {        /* a set of channel hashes (open addressing) */
    uint64_t *v;
    uint32_t n, cap;
} rf_set_t;

typedef struct rf {
    rf_scan_t sc;
    /* requests (RequestParser) */
    int64_t rq_left, rq_total, rq_skip;
    char *rq_line;
    uint32_t rq_linelen, rq_linecap;
    uint8_t rq_capturing, rq_nargs, rq_capping;   /* rq_capping: an argument arriving */
    uint32_t rq_arglen[3];
    char rq_args[3][RF_ARG];
    uint8_t request_error;
    /* matching (Conversation) */
    rf_queue_t pending, queued;
    rf_set_t subs[3];
    int64_t sub_left;   /* -1: None */
    uint8_t protocol, in_multi, special, req_multi, reply_off, skip_next, opaque;
    /* the reply driver */
    char *hold;         /* an incomplete frame that must be seen whole */
    size_t holdlen, holdcap;
    char *out;          /* RF_EMIT / RF_ASK bytes the framer owns (a rewritten redirect) */
    uint8_t *spec;      /* RF_ASK_EXEC: a rewriter id per EXEC result */
    size_t speccap;
    rf_lookup_fn lookup;
    void *lookup_ctx;
    uint64_t redirects; /* rewritten here */
    /* a Memcached connection instead (mc_framer.h): the RESP state above stays unused */
    int64_t mc_block, mc_need;
    uint8_t mc, mc_started, mc_cont;
} rf_t;

typedef struct {
    size_t fwd;
    const char *data;
    size_t len;
    int ask;            /* RF_ASK_* */
    const uint8_t *spec;
    size_t speclen;
    int redirect;       /* RF_EMIT of a redirect rewritten here */
} rf_out_t;

void rf_init(rf_t *f, rf_lookup_fn lookup, void *ctx);
void rf_free(rf_t *f);
/* Note the commands in a client chunk (call before it goes to the node). */
void rf_request(rf_t *f, const char *p, size_t n);
/* Frame a chunk from the node; returns the bytes of p consumed; see rf_action. */
size_t rf_reply(rf_t *f, const char *p, size_t n, rf_out_t *o, int *action);
/* Free what the last rf_reply emitted (call once its bytes are sent or copied). */
void rf_release(rf_t *f);
/* Whether the state is a fresh connection's (nothing pending, RESP2, no subscription,
 * no MULTI, ...): then it may serve another connection (rf_rebind). */
int rf_idle(const rf_t *f);
void rf_rebind(rf_t *f, rf_lookup_fn lookup, void *ctx);
/* Which protocol the state frames: 0 RESP, 1 Memcached text (set after rf_init/rebind). */
void rf_protocol(rf_t *f, int mc);
/* Append p[0:n] to the held bytes (mc_framer.c); -1 past RF_MAX_HOLD or out of memory. */
int rf_hold(rf_t *f, const char *p, size_t n);
/* Bytes held for an incomplete frame (tests). */
size_t rf_held(const rf_t *f);
/* Commands whose replies are due (tests). */
uint64_t rf_pending(const rf_t *f);

#endif
