/* The client side of the RESP framer (resp_internal.h): requests.py's RequestParser,
 * its whole-command fast path and its byte-by-byte path, and matching.py's
 * Conversation.request, which notes each command in the pending queue before the node
 * sees it (what the reply will mean: resp_match.c reads it). */
#include "resp_internal.h"

#include "mc_framer.h"

#include <stdlib.h>
#include <string.h>

/* -- command names --------------------------------------------------------------- */

static const char *NAMES[] = {"", "cluster", "client", "multi", "exec", "discard", "hello",
                              "reset", "subscribe", "psubscribe", "ssubscribe", "unsubscribe",
                              "punsubscribe", "sunsubscribe", "monitor", "sync", "psync"};
#define NNAMES (sizeof(NAMES) / sizeof(NAMES[0]))

static int name_id(const char *a, size_t n) {
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

/* CAPTURE_FOR: the commands whose arguments matching looks at. */
static int captured_name(int id) { return id != N_OTHER; }

/* -- noting a command (matching.py Conversation.request) ------------------------- */

static int rw_of(const char *a, size_t n) {
    if (ieq(a, n, "slots")) return RW_SLOTS;
    if (ieq(a, n, "shards")) return RW_SHARDS;
    if (ieq(a, n, "nodes")) return RW_NODES;
    if (ieq(a, n, "replicas") || ieq(a, n, "slaves")) return RW_REPLICAS;
    return RW_NONE;
}

/* A command: name and the first two arguments as captured (len > RF_ARG: kept only as a
 * length; UINT32_MAX: not captured). */
static void conv_request(rf_t *f, int nargs, uint32_t argc, int inl) {
    (void)inl;
    int id = nargs ? (f->rq_arglen[0] <= RF_ARG ? name_id(f->rq_args[0], f->rq_arglen[0])
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

/* -- requests (requests.py RequestParser) --------------------------------------- */

static void rq_start(rf_t *f, int64_t count) {
    f->rq_left = f->rq_total = count;
    f->rq_nargs = 0;
    f->rq_capturing = 1;
}

/* An argument was read: value (a prefix of it, len its full length) if captured. */
static void rq_done_arg(rf_t *f, int have, uint32_t len) {
    if (f->rq_capturing) {
        if (!have || f->rq_nargs > 2) {
            f->rq_capturing = 0;
        } else {
            f->rq_arglen[f->rq_nargs++] = len;
            if (f->rq_nargs == 1 && !(len <= RF_ARG && captured_name(name_id(f->rq_args[0], len))))
                f->rq_capturing = 0;
        }
    }
    if (--f->rq_left)
        return;
    conv_request(f, f->rq_nargs, (uint32_t)(f->rq_total - 1), 0);
}

static int hexv(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = lower(c);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static int ws(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 11 || c == 12; }

/* split_inline: the first three arguments kept (prefixes), all counted. */
static int split_inline(rf_t *f, const char *line, size_t n, uint32_t *argc) {
    const char *nul = memchr(line, 0, n);
    if (nul)
        n = (size_t)(nul - line);
    size_t i = 0;
    uint32_t count = 0;
    for (;;) {
        while (i < n && ws((unsigned char)line[i]))
            i++;
        if (i >= n) {
            *argc = count;
            return 0;
        }
        size_t len = 0;
        char *cur = count < 3 ? f->rq_args[count] : NULL;
#define ADD(ch) do { if (cur && len < RF_ARG) cur[len] = (char)(ch); len++; } while (0)
        int quote = 0;
        for (;;) {
            int c = i < n ? (unsigned char)line[i] : 0;
            if (quote == '"') {
                if (c == '\\' && i + 3 < n && line[i + 1] == 'x' &&
                        hexv((unsigned char)line[i + 2]) >= 0 && hexv((unsigned char)line[i + 3]) >= 0) {
                    ADD(hexv((unsigned char)line[i + 2]) * 16 + hexv((unsigned char)line[i + 3]));
                    i += 3;
                } else if (c == '\\' && i + 1 < n) {
                    i++;
                    int e = (unsigned char)line[i];
                    ADD(e == 'n' ? 10 : e == 'r' ? 13 : e == 't' ? 9 : e == 'b' ? 8 : e == 'a' ? 7 : e);
                } else if (c == '"') {
                    if (i + 1 < n && !ws((unsigned char)line[i + 1]))
                        return -1;
                    i++;
                    break;
                } else if (i >= n) {
                    return -1;
                } else {
                    ADD(c);
                }
            } else if (quote == '\'') {
                if (c == '\\' && i + 1 < n && line[i + 1] == '\'') {
                    i++;
                    ADD('\'');
                } else if (c == '\'') {
                    if (i + 1 < n && !ws((unsigned char)line[i + 1]))
                        return -1;
                    i++;
                    break;
                } else if (i >= n) {
                    return -1;
                } else {
                    ADD(c);
                }
            } else {
                if (i >= n || c == ' ' || c == '\n' || c == '\r' || c == '\t')
                    break;
                if (c == '"' || c == '\'')
                    quote = c;
                else
                    ADD(c);
            }
            i++;
        }
#undef ADD
        if (count < 3)
            f->rq_arglen[count] = len > UINT32_MAX ? UINT32_MAX : (uint32_t)len;
        count++;
    }
}

static const char *find_crlf(const char *p, size_t n) {
    for (;;) {
        const char *cr = memchr(p, '\r', n);
        if (cr == NULL || (size_t)(cr - p) + 1 >= n)
            return NULL;
        if (cr[1] == '\n')
            return cr;
        n -= (size_t)(cr - p) + 1;
        p = cr + 1;
    }
}

/* RequestParser._whole: a complete, well-formed multibulk command at d[pos:n]; its end
 * or 0 (take the byte-by-byte path). */
static size_t rq_whole(rf_t *f, const char *d, size_t n, size_t pos) {
    const char *nl = find_crlf(d + pos, n - pos);
    int64_t count, size;
    if (nl == NULL || pyint(d + pos + 1, (size_t)(nl - d) - pos - 1, &count) < 0)
        return 0;
    if (count <= 0 || count > 1048576)
        return 0;
    size_t p = (size_t)(nl - d) + 2;
    int keep = 3, nargs = 0;
    uint32_t lens[3];
    char args[3][RF_ARG];
    for (int64_t k = 0; k < count; k++) {
        if (p >= n || d[p] != '$')
            return 0;
        nl = find_crlf(d + p, n - p);
        if (nl == NULL || pyint(d + p + 1, (size_t)(nl - d) - p - 1, &size) < 0)
            return 0;
        size_t at = (size_t)(nl - d) + 2;
        if (size < 0 || size + 2 > (int64_t)(n - at))
            return 0;
        p = at + (size_t)size + 2;
        if (keep) {
            if (size <= 512 && nargs < keep) {
                lens[nargs] = (uint32_t)size;
                memcpy(args[nargs], d + at, size < RF_ARG ? (size_t)size : RF_ARG);
                nargs++;
                if (nargs == 1 && !(size <= RF_ARG && captured_name(name_id(args[0], (size_t)size))))
                    keep = 0;
            } else {
                keep = 0;
            }
        }
    }
    memcpy(f->rq_args, args, sizeof(args));
    memcpy(f->rq_arglen, lens, sizeof(lens));
    conv_request(f, nargs, (uint32_t)(count - 1), 0);
    return p;
}

static int rq_feed(rf_t *f, const char *d, size_t n) {
    size_t pos = 0;
    for (;;) {
        if (!f->rq_left && !f->rq_skip && !f->rq_linelen && pos < n && d[pos] == '*') {
            size_t end = rq_whole(f, d, n, pos);
            if (end) {
                pos = end;
                continue;
            }
        }
        if (f->rq_skip) {
            int64_t take = f->rq_skip < (int64_t)(n - pos) ? f->rq_skip : (int64_t)(n - pos);
            if (f->rq_capping) {
                /* bytes of the payload (and its CRLF) arriving: keep the first ones */
                uint32_t i = f->rq_nargs;
                int64_t done = (int64_t)f->rq_arglen[i] + 2 - f->rq_skip;
                for (int64_t k = 0; k < take && done + k < RF_ARG; k++)
                    f->rq_args[i][done + k] = d[pos + k];
            }
            pos += (size_t)take;
            f->rq_skip -= take;
            if (f->rq_skip)
                return 0;
            int have = f->rq_capping;
            f->rq_capping = 0;
            rq_done_arg(f, have, have ? f->rq_arglen[f->rq_nargs] : 0);
            continue;
        }
        if (pos >= n)
            return 0;
        const char *nlp = memchr(d + pos, '\n', n - pos);
        if (nlp == NULL) {
            if (rf_grow(&f->rq_line, &f->rq_linecap, f->rq_linelen + (n - pos)) < 0)
                return -1;
            memcpy(f->rq_line + f->rq_linelen, d + pos, n - pos);
            f->rq_linelen += (uint32_t)(n - pos);
            if (f->rq_linelen > RF_MAX_INLINE)
                return -1;
            return 0;
        }
        const char *line;
        size_t ll, take = (size_t)(nlp - d) + 1 - pos;
        if (f->rq_linelen) {
            if (rf_grow(&f->rq_line, &f->rq_linecap, f->rq_linelen + take) < 0)
                return -1;
            memcpy(f->rq_line + f->rq_linelen, d + pos, take);
            line = f->rq_line;
            ll = f->rq_linelen + take;
            f->rq_linelen = 0;
        } else {
            line = d + pos;
            ll = take;
        }
        pos += take;
        int64_t v;
        if (f->rq_left) {
            if (line[0] != '$' || ll < 4 || line[ll - 2] != '\r')
                return -1;
            if (pyint(line + 1, ll - 3, &v) < 0 || v < 0 || v > RF_MAX_BULK)
                return -1;
            int keep = f->rq_capturing && v <= 512 && f->rq_nargs <= 2;
            if (v + 2 <= (int64_t)(n - pos)) {
                if (keep)
                    memcpy(f->rq_args[f->rq_nargs], d + pos, v < RF_ARG ? (size_t)v : RF_ARG);
                pos += (size_t)v + 2;
                rq_done_arg(f, keep, (uint32_t)v);
            } else {
                f->rq_skip = v + 2;
                if (keep) {
                    f->rq_capping = 1;
                    f->rq_arglen[f->rq_nargs] = (uint32_t)v;
                }
            }
            continue;
        }
        if (line[0] == '*') {
            if (ll < 4 || line[ll - 2] != '\r')
                return -1;
            if (pyint(line + 1, ll - 3, &v) < 0 || v > 1024 * 1024)
                return -1;
            if (v <= 0)
                continue;
            rq_start(f, v);
            continue;
        }
        uint32_t argc;
        size_t body = ll >= 2 && line[ll - 2] == '\r' ? ll - 2 : ll - 1;
        if (split_inline(f, line, body, &argc) < 0)
            return -1;
        if (argc)
            conv_request(f, argc < 3 ? (int)argc : 3, argc - 1, 1);
    }
}

void rf_request(rf_t *f, const char *p, size_t n) {
    if (f->mc) {
        mc_request(f, p, n);
        return;
    }
    if (f->request_error || f->opaque)
        return;
    if (rq_feed(f, p, n) < 0) {
        f->request_error = 1;
        free(f->rq_line);
        f->rq_line = NULL;
        f->rq_linelen = f->rq_linecap = 0;
    }
}
