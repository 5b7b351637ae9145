/*
 * cacheport bench client: ping-pong latency, pipelined load and idle-connection holding
 * against redis (RESP) or memcached (text protocol).
 *
 * Why C: redis-benchmark reports latency in ~8 us buckets, too coarse for a
 * difference of ~25 us; here every request is timed with clock_gettime(CLOCK_MONOTONIC)
 * and written out as nanoseconds. Every response is compared byte for byte
 * with the one expected, so a proxy that corrupts or reorders data fails loudly.
 *
 * Built by bench/clients.py with `cc -O2`; its command line is mirrored by
 * bench/pyclient.py (the fallback when there is no compiler).
 *
 *   client -m lat  -H host -p port -P redis|memcached -x get|set|mix -s size -n N -t secs
 *                  [-w warmup] [-o latencies.u32]
 *   client -m pipe -H host -p port -P ... -x get|set -s size -c conns -d depth -n N -t secs
 *   client -m hold -H host -p port -P ... -c conns -t secs   (prints "ready N", waits for
 *                  EOF on stdin, closes everything)
 *
 * The last line on stdout is one JSON object with the counts and elapsed time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RECV_BUF (256 * 1024)

static const char *host = "127.0.0.1";
static int port = 0;
static int redis = 1;
static const char *mode = "lat";
static const char *op = "get";
static const char *key = "cacheport:bench";
static long vsize = 100;
static long nreq = 10000;
static double tcap = 10.0;
static long warmup = 100;
static long nconn = 1;
static long depth = 1;
static const char *outpath = NULL;

static void die(const char *msg) {
    fprintf(stderr, "client: %s: %s\n", msg, errno ? strerror(errno) : "failed");
    exit(1);
}

static void fail(const char *msg) {
    fprintf(stderr, "client: %s\n", msg);
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A request and the exact response it must get. */
typedef struct {
    char *req;
    size_t req_len;
    char *resp;
    size_t resp_len;
} exchange;

static char *value;

static void build(exchange *ex, int is_set) {
    size_t klen = strlen(key);
    size_t cap = (size_t)vsize + klen + 128;
    ex->req = malloc(cap);
    ex->resp = malloc(cap);
    if (!ex->req || !ex->resp) fail("out of memory");
    int n;
    if (redis && is_set) {
        n = snprintf(ex->req, cap, "*3\r\n$3\r\nSET\r\n$%zu\r\n%s\r\n$%ld\r\n", klen, key, vsize);
        memcpy(ex->req + n, value, (size_t)vsize);
        memcpy(ex->req + n + vsize, "\r\n", 2);
        ex->req_len = (size_t)n + (size_t)vsize + 2;
        ex->resp_len = (size_t)snprintf(ex->resp, cap, "+OK\r\n");
    } else if (redis) {
        ex->req_len = (size_t)snprintf(ex->req, cap, "*2\r\n$3\r\nGET\r\n$%zu\r\n%s\r\n", klen, key);
        n = snprintf(ex->resp, cap, "$%ld\r\n", vsize);
        memcpy(ex->resp + n, value, (size_t)vsize);
        memcpy(ex->resp + n + vsize, "\r\n", 2);
        ex->resp_len = (size_t)n + (size_t)vsize + 2;
    } else if (is_set) {
        n = snprintf(ex->req, cap, "set %s 0 0 %ld\r\n", key, vsize);
        memcpy(ex->req + n, value, (size_t)vsize);
        memcpy(ex->req + n + vsize, "\r\n", 2);
        ex->req_len = (size_t)n + (size_t)vsize + 2;
        ex->resp_len = (size_t)snprintf(ex->resp, cap, "STORED\r\n");
    } else {
        ex->req_len = (size_t)snprintf(ex->req, cap, "get %s\r\n", key);
        n = snprintf(ex->resp, cap, "VALUE %s 0 %ld\r\n", key, vsize);
        memcpy(ex->resp + n, value, (size_t)vsize);
        memcpy(ex->resp + n + vsize, "\r\nEND\r\n", 7);
        ex->resp_len = (size_t)n + (size_t)vsize + 7;
    }
}

static struct sockaddr_storage addr;
static socklen_t addrlen;

static void resolve(void) {
    struct addrinfo hints = {0}, *res;
    char portstr[16];
    hints.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof portstr, "%d", port);
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "client: cannot resolve %s: %s\n", host, gai_strerror(rc));
        exit(1);
    }
    memcpy(&addr, res->ai_addr, res->ai_addrlen);
    addrlen = res->ai_addrlen;
    freeaddrinfo(res);
}

static int open_conn(int nonblock) {
    int fd = socket(addr.ss_family, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        fprintf(stderr, "client: connect %s:%d: %s\n", host, port, strerror(errno));
        exit(1);
    }
    return fd;
}

static void send_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        buf += n;
        len -= (size_t)n;
    }
}

static char *rbuf;

/* Read exactly one expected response, comparing as it arrives. */
static void expect(int fd, const exchange *ex) {
    size_t got = 0;
    while (got < ex->resp_len) {
        size_t want = ex->resp_len - got;
        if (want > RECV_BUF) want = RECV_BUF;
        ssize_t n = recv(fd, rbuf, want, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recv");
        }
        if (n == 0) fail("connection closed by peer mid-response");
        if (memcmp(rbuf, ex->resp + got, (size_t)n) != 0) {
            fprintf(stderr, "client: unexpected response at byte %zu: %.60s\n", got, rbuf);
            exit(1);
        }
        got += (size_t)n;
    }
}

static void print_result(long done, double elapsed, long long bin, long long bout, long errors) {
    printf("{\"mode\": \"%s\", \"requests\": %ld, \"elapsed_s\": %.6f, \"bytes_in\": %lld, "
           "\"bytes_out\": %lld, \"errors\": %ld, \"connections\": %ld}\n",
           mode, done, elapsed, bin, bout, errors, nconn);
    fflush(stdout);
}

static int run_lat(void) {
    exchange get, set;
    build(&get, 0);
    build(&set, 1);
    int fd = open_conn(0);
    /* The key exists before the first timed GET. */
    send_all(fd, set.req, set.req_len);
    expect(fd, &set);
    int mix = strcmp(op, "mix") == 0;
    int only_set = strcmp(op, "set") == 0;
    for (long i = 0; i < warmup; i++) {
        const exchange *ex = (mix ? (i & 1) == 0 : only_set) ? &set : &get;
        send_all(fd, ex->req, ex->req_len);
        expect(fd, ex);
    }
    uint32_t *lat = malloc(sizeof(uint32_t) * (size_t)(nreq > 0 ? nreq : 1));
    if (!lat) fail("out of memory");
    long long bin = 0, bout = 0;
    long done = 0;
    double start = now();
    double deadline = start + tcap;
    for (; done < nreq; done++) {
        const exchange *ex = (mix ? (done & 1) == 0 : only_set) ? &set : &get;
        uint64_t t0 = now_ns();
        send_all(fd, ex->req, ex->req_len);
        expect(fd, ex);
        uint64_t dt = now_ns() - t0;
        lat[done] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
        bout += (long long)ex->req_len;
        bin += (long long)ex->resp_len;
        if ((done & 63) == 63 && now() > deadline) {
            done++;
            break;
        }
    }
    double elapsed = now() - start;
    close(fd);
    if (outpath) {
        FILE *f = fopen(outpath, "wb");
        if (!f) die("open output");
        if (fwrite(lat, sizeof(uint32_t), (size_t)done, f) != (size_t)done) die("write output");
        fclose(f);
    }
    print_result(done, elapsed, bin, bout, 0);
    return 0;
}

typedef struct {
    int fd;
    long out_off;      /* bytes of the current batch sent */
    long in_off;       /* bytes of the current batch received */
    int active;        /* a batch is in flight */
    int want_out;
} conn;

static int run_pipe(void) {
    exchange ex, set;
    int is_set = strcmp(op, "set") == 0;
    build(&ex, is_set);
    build(&set, 1);
    {
        int fd = open_conn(0);
        send_all(fd, set.req, set.req_len);
        expect(fd, &set);
        close(fd);
    }
    size_t batch_len = ex.req_len * (size_t)depth;
    char *batch = malloc(batch_len);
    if (!batch) fail("out of memory");
    for (long i = 0; i < depth; i++) memcpy(batch + (size_t)i * ex.req_len, ex.req, ex.req_len);
    long batch_resp = (long)ex.resp_len * depth;

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    conn *cs = calloc((size_t)nconn, sizeof(conn));
    if (!cs) fail("out of memory");
    long batches_total = (nreq + depth - 1) / depth;
    long started = 0, finished = 0, inflight = 0;
    long long bin = 0, bout = 0;
    double start = now();
    double deadline = start + tcap;
    int timed_out = 0;

    for (long i = 0; i < nconn; i++) {
        cs[i].fd = open_conn(0);
        int fl = fcntl(cs[i].fd, F_GETFL);
        fcntl(cs[i].fd, F_SETFL, fl | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) die("epoll_ctl");
    }

    struct epoll_event evs[256];
    for (;;) {
        /* Start batches on idle connections while work remains. */
        for (long i = 0; i < nconn && !timed_out; i++) {
            conn *c = &cs[i];
            if (c->active || started >= batches_total) continue;
            c->active = 1;
            c->out_off = 0;
            c->in_off = 0;
            started++;
            inflight++;
            ssize_t n = send(c->fd, batch, batch_len, MSG_NOSIGNAL);
            if (n < 0 && errno != EAGAIN) die("send");
            if (n > 0) c->out_off = n;
            if ((size_t)c->out_off < batch_len && !c->want_out) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = (uint64_t)i};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->want_out = 1;
            }
        }
        if (inflight == 0) break;
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        if (now() > deadline) {
            if (!timed_out) timed_out = 1;
            /* Let the batches in flight finish, but not forever. */
            if (now() > deadline + 10) fail("batches still in flight 10 s after the time cap");
        }
        for (int e = 0; e < n; e++) {
            long i = (long)evs[e].data.u64;
            conn *c = &cs[i];
            if ((evs[e].events & EPOLLOUT) && (size_t)c->out_off < batch_len) {
                ssize_t w = send(c->fd, batch + c->out_off, batch_len - (size_t)c->out_off,
                                 MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN) die("send");
                if (w > 0) c->out_off += w;
                if ((size_t)c->out_off == batch_len && c->want_out) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    c->want_out = 0;
                }
            }
            if (evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                for (;;) {
                    long want = batch_resp - c->in_off;
                    if (want <= 0) break;
                    if (want > RECV_BUF) want = RECV_BUF;
                    ssize_t r = recv(c->fd, rbuf, (size_t)want, 0);
                    if (r < 0) {
                        if (errno == EAGAIN || errno == EINTR) break;
                        die("recv");
                    }
                    if (r == 0) fail("connection closed by peer mid-batch");
                    if (!c->active) fail("bytes received with no request in flight");
                    /* Compare against the expected response, piece by piece. */
                    long p = 0;
                    while (p < r) {
                        long pos = (c->in_off + p) % (long)ex.resp_len;
                        long k = (long)ex.resp_len - pos;
                        if (k > r - p) k = r - p;
                        if (memcmp(rbuf + p, ex.resp + pos, (size_t)k) != 0) {
                            fprintf(stderr, "client: unexpected response: %.60s\n", rbuf + p);
                            exit(1);
                        }
                        p += k;
                    }
                    c->in_off += r;
                    bin += r;
                }
                if (c->active && c->in_off == batch_resp) {
                    c->active = 0;
                    inflight--;
                    finished++;
                    bout += (long long)batch_len;
                }
            }
        }
    }
    double elapsed = now() - start;
    for (long i = 0; i < nconn; i++) close(cs[i].fd);
    print_result(finished * depth, elapsed, bin, bout, 0);
    return 0;
}

/* Open nconn connections, one small request each, hold them until stdin closes. */
static int run_hold(void) {
    const char *ping = redis ? "PING\r\n" : "version\r\n";
    size_t ping_len = strlen(ping);
    int *fds = malloc(sizeof(int) * (size_t)nconn);
    char *state = calloc((size_t)nconn, 1); /* 0 connecting, 1 sent, 2 answered */
    if (!fds || !state) fail("out of memory");
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    long opened = 0, answered = 0, pending = 0;
    const long max_pending = 256; /* stay under listen backlogs: no SYN retransmit stalls */
    double start = now();
    double deadline = start + tcap;
    struct epoll_event evs[512];
    while (answered < nconn) {
        while (opened < nconn && pending < max_pending) {
            int fd = open_conn(1);
            fds[opened] = fd;
            struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u64 = (uint64_t)opened};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
            opened++;
            pending++;
        }
        if (now() > deadline) {
            fprintf(stderr, "client: only %ld of %ld connections answered within %.0f s\n",
                    answered, nconn, tcap);
            exit(1);
        }
        int n = epoll_wait(ep, evs, 512, 200);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            long i = (long)evs[e].data.u64;
            int fd = fds[i];
            if (evs[e].events & (EPOLLERR | EPOLLHUP)) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                fprintf(stderr, "client: connection %ld failed: %s\n", i,
                        err ? strerror(err) : "closed");
                exit(1);
            }
            if (state[i] == 0 && (evs[e].events & EPOLLOUT)) {
                send_all(fd, ping, ping_len);
                state[i] = 1;
                struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
            } else if (state[i] == 1 && (evs[e].events & EPOLLIN)) {
                char buf[256];
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r <= 0) {
                    fprintf(stderr, "client: connection %ld closed before answering\n", i);
                    exit(1);
                }
                if (r >= 2 && buf[r - 2] == '\r' && buf[r - 1] == '\n') {
                    state[i] = 2;
                    answered++;
                    pending--;
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                }
            }
        }
    }
    double elapsed = now() - start;
    printf("ready %ld %.6f\n", answered, elapsed);
    fflush(stdout);
    /* Hold until the bench closes our stdin (or dies). */
    char tmp[64];
    while (read(0, tmp, sizeof tmp) > 0) {
    }
    for (long i = 0; i < opened; i++) close(fds[i]);
    print_result(answered, elapsed, 0, 0, 0);
    return 0;
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "m:H:p:P:x:s:n:t:w:c:d:o:k:")) != -1) {
        switch (opt) {
        case 'm': mode = optarg; break;
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': redis = strcmp(optarg, "redis") == 0; break;
        case 'x': op = optarg; break;
        case 's': vsize = atol(optarg); break;
        case 'n': nreq = atol(optarg); break;
        case 't': tcap = atof(optarg); break;
        case 'w': warmup = atol(optarg); break;
        case 'c': nconn = atol(optarg); break;
        case 'd': depth = atol(optarg); break;
        case 'o': outpath = optarg; break;
        case 'k': key = optarg; break;
        default: fail("bad arguments (see the comment at the top of client.c)");
        }
    }
    if (port <= 0 || vsize < 0 || nreq < 0 || nconn < 1 || depth < 1) fail("bad arguments");
    value = malloc((size_t)vsize + 1);
    rbuf = malloc(RECV_BUF);
    if (!value || !rbuf) fail("out of memory");
    for (long i = 0; i < vsize; i++) value[i] = (char)('a' + i % 26);
    resolve();
    if (strcmp(mode, "lat") == 0) return run_lat();
    if (strcmp(mode, "pipe") == 0) return run_pipe();
    if (strcmp(mode, "hold") == 0) return run_hold();
    fail("unknown mode");
    return 1;
}
