/* TLS in the engine thread (tls_engine.h): OpenSSL's record layer on the engine's
 * non-blocking sockets, on the SSL_CTX of Python's ssl.SSLContext.
 *
 * Why Python's context: proxy/tls.py already builds and checks it from the config
 * (TLS 1.2+, the certificate, mutual TLS, the CA, verification), and rebuilds it on
 * every reload; taking its SSL_CTX keeps one source of truth. CPython's _SSLContext
 * object starts with its SSL_CTX pointer (Modules/_ssl.c, PySSLContext), and _ssl links
 * the same system libssl: same_libssl() checks at import that both resolve SSL_CTX_new
 * to the same function, else the engine does no TLS and the Python relay serves.
 * Each connection's SSL holds a reference to its SSL_CTX, so a reload that drops the
 * Python object leaves live connections as they are.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef CACHEPORT_TLS

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "tls_engine.h"

#define REASON_MAX 120

/* Only the first field of CPython's PySSLContext is read (3.11: PyObject_HEAD; SSL_CTX*). */
typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} py_ssl_context;

struct tls_conn {
    SSL *ssl[2];            /* NULL: that side is plain */
    uint32_t hs_want[2];    /* EPOLLIN/OUT a handshake waits for */
    uint8_t hs_done[2];
    uint8_t rd_out[2];      /* SSL_read needs the socket writable (a renegotiation-like write) */
    uint8_t wr_in[2];       /* SSL_write needs it readable */
    uint8_t notified[2];    /* close_notify sent */
    uint8_t rd_end[2];      /* read hit its end after handing bytes back: 1 EOF, 2 error */
    int rd_errno[2];
    int fail_side;
    char *reason;           /* the first failure, allocated only then */
    char *sess_key;         /* the upstream leg: where its session is cached (name, address) */
    uint8_t sess_saved;
};

typedef struct {
    uint32_t slot;
    int side;
    double not_after;        /* a handshake done: the peer certificate's notAfter */
    char reason[REASON_MAX]; /* a handshake failed: why ("" otherwise) */
} tls_failure_t;

struct tls_book {
    uint32_t n, cap;
    tls_failure_t *v;
};

/* Sessions toward nodes, so a reconnect (a client storm after a failover, a pool
 * refilling) resumes instead of a full handshake on the node: the last resumable session
 * per (SSL_CTX, server name, node address), a few dozen entries for the process. An entry
 * holds its SSL_CTX, so a reload's old context lives until its entries are replaced. */
#define SESS_MAX 64
typedef struct {
    SSL_CTX *ctx;
    char *key;
    SSL_SESSION *sess;
} sess_entry_t;

static sess_entry_t sess_cache[SESS_MAX];
static unsigned sess_next;
static pthread_mutex_t sess_lock = PTHREAD_MUTEX_INITIALIZER;

static char *sess_key_of(const char *name, int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    char host[INET6_ADDRSTRLEN] = "?", key[512];
    int port = 0;
    if (getpeername(fd, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
            port = ntohs(a->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
            port = ntohs(a->sin6_port);
        }
    }
    snprintf(key, sizeof(key), "%s|%s|%d", name != NULL ? name : "", host, port);
    return strdup(key);
}

static SSL_SESSION *sess_get(SSL_CTX *ctx, const char *key) {
    SSL_SESSION *found = NULL;
    pthread_mutex_lock(&sess_lock);
    for (unsigned k = 0; k < SESS_MAX; k++) {
        sess_entry_t *en = &sess_cache[k];
        if (en->ctx == ctx && en->key != NULL && strcmp(en->key, key) == 0) {
            if (SSL_SESSION_up_ref(en->sess))
                found = en->sess;
            break;
        }
    }
    pthread_mutex_unlock(&sess_lock);
    return found;
}

/* Takes ``sess``. */
static void sess_put(SSL_CTX *ctx, const char *key, SSL_SESSION *sess) {
    pthread_mutex_lock(&sess_lock);
    sess_entry_t *en = NULL;
    for (unsigned k = 0; k < SESS_MAX && en == NULL; k++)
        if (sess_cache[k].ctx == ctx && sess_cache[k].key != NULL &&
                strcmp(sess_cache[k].key, key) == 0)
            en = &sess_cache[k];
    if (en != NULL) {
        SSL_SESSION_free(en->sess);
        en->sess = sess;
    } else {
        char *copy = strdup(key);
        if (copy == NULL || !SSL_CTX_up_ref(ctx)) {
            free(copy);
            SSL_SESSION_free(sess);
        } else {
            en = &sess_cache[sess_next++ % SESS_MAX];
            if (en->ctx != NULL) {
                SSL_SESSION_free(en->sess);
                SSL_CTX_free(en->ctx);
                free(en->key);
            }
            en->ctx = ctx;
            en->key = copy;
            en->sess = sess;
        }
    }
    pthread_mutex_unlock(&sess_lock);
}

/* After the upstream leg's first read: TLS 1.3 tickets come after the handshake, so the
 * session is worth keeping only now. */
static void sess_save(tls_conn_t *t) {
    SSL *ssl = t->ssl[1];
    t->sess_saved = 1;
    SSL_SESSION *live = SSL_get0_session(ssl);
    if (live == NULL || !SSL_SESSION_is_resumable(live))
        return;
    /* A copy: a node that closes without close_notify (redis-server does) makes OpenSSL
     * mark the connection's own session unresumable when it is freed. */
    SSL_SESSION *sess = SSL_SESSION_dup(live);
    if (sess != NULL)
        sess_put(SSL_get_SSL_CTX(ssl), t->sess_key, sess);
}

static SSL_CTX *ctx_of(PyObject *o) {
    for (PyTypeObject *t = Py_TYPE(o); t != NULL; t = t->tp_base)
        if (strcmp(t->tp_name, "_ssl._SSLContext") == 0)
            return ((py_ssl_context *)o)->ctx;
    PyErr_Format(PyExc_TypeError, "expected an ssl.SSLContext, got %s", Py_TYPE(o)->tp_name);
    return NULL;
}

static int is_ip(const char *name) {
    unsigned char buf[16];
    return inet_pton(AF_INET, name, buf) == 1 || inet_pton(AF_INET6, name, buf) == 1;
}

static SSL *new_ssl(SSL_CTX *ctx, int fd, int server) {
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL)
        return NULL;
    if (!SSL_set_fd(ssl, fd)) {
        SSL_free(ssl);
        return NULL;
    }
    /* Partial writes and a moving buffer: the engine's copy path retries a short write
     * from its held copy. Idle connections give their record buffers back. */
    SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                 SSL_MODE_RELEASE_BUFFERS);
    SSL_clear_mode(ssl, SSL_MODE_AUTO_RETRY);
    /* A peer's TCP FIN without close_notify is its end of stream, as for a plain one
     * (redis-cli, most clients); no renegotiation mid-stream. */
    SSL_set_options(ssl, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
    if (server)
        SSL_set_accept_state(ssl);
    else
        SSL_set_connect_state(ssl);
    return ssl;
}

tls_conn_t *tls_conn_new(PyObject *spec, int cfd, int ufd) {
    PyObject *sctx, *cctx, *vname, *sni;
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "tls: (server_ctx, client_ctx, verify_name, sni), None where not used");
        return NULL;
    }
    sctx = PyTuple_GET_ITEM(spec, 0);
    cctx = PyTuple_GET_ITEM(spec, 1);
    vname = PyTuple_GET_ITEM(spec, 2);
    sni = PyTuple_GET_ITEM(spec, 3);
    if (sctx == Py_None && cctx == Py_None) {
        PyErr_SetString(PyExc_ValueError, "tls: neither side speaks TLS");
        return NULL;
    }
    const char *name = NULL, *sniname = NULL;
    if (vname != Py_None && (name = PyUnicode_AsUTF8(vname)) == NULL)
        return NULL;
    if (sni != Py_None && (sniname = PyUnicode_AsUTF8(sni)) == NULL)
        return NULL;
    SSL_CTX *server = NULL, *client = NULL;
    if (sctx != Py_None && (server = ctx_of(sctx)) == NULL)
        return NULL;
    if (cctx != Py_None && (client = ctx_of(cctx)) == NULL)
        return NULL;
    tls_conn_t *t = calloc(1, sizeof(*t));
    if (t == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    /* A server waits for the ClientHello; a client's first step is to write its own. */
    t->hs_want[0] = EPOLLIN;
    t->hs_want[1] = EPOLLOUT;
    if (server != NULL && (t->ssl[0] = new_ssl(server, cfd, 1)) == NULL)
        goto fail;
    if (client != NULL) {
        SSL *ssl = t->ssl[1] = new_ssl(client, ufd, 0);
        if (ssl == NULL)
            goto fail;
        /* What Python's wrap(server_hostname=...) does: SNI for a name, not for an
         * address; the certificate checked against the name or the address. */
        if (sniname != NULL && !is_ip(sniname) && !SSL_set_tlsext_host_name(ssl, sniname))
            goto fail;
        if (name != NULL) {
            int ok = is_ip(name) ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name)
                                 : SSL_set1_host(ssl, name);
            if (!ok)
                goto fail;
        }
        t->sess_key = sess_key_of(sniname != NULL ? sniname : name, ufd);
        if (t->sess_key == NULL)
            goto fail;
        SSL_SESSION *sess = sess_get(client, t->sess_key);
        if (sess != NULL) {
            SSL_set_session(ssl, sess);  /* takes its own reference */
            SSL_SESSION_free(sess);
        }
    }
    return t;
fail:
    tls_free(t);
    ERR_clear_error();
    PyErr_SetString(PyExc_MemoryError, "cannot make a TLS session");
    return NULL;
}

void tls_free(tls_conn_t *t) {
    if (t == NULL)
        return;
    for (int s = 0; s < 2; s++)
        if (t->ssl[s] != NULL)
            SSL_free(t->ssl[s]);
    free(t->reason);
    free(t->sess_key);
    free(t);
    ERR_clear_error();
}

int tls_on(const tls_conn_t *t, int side) {
    return t != NULL && t->ssl[side] != NULL;
}

int tls_handshaking(const tls_conn_t *t) {
    for (int s = 0; s < 2; s++)
        if (t->ssl[s] != NULL && !t->hs_done[s])
            return 1;
    return 0;
}

void tls_fail(tls_conn_t *t, int side, const char *why) {
    if (t->reason != NULL)
        return;
    t->reason = strdup(why);
    t->fail_side = side;
}

const char *tls_failure(const tls_conn_t *t, int *side) {
    *side = t->fail_side;
    return t->reason;
}

/* Why a handshake failed, in the words the listener logs (proxy/handshake.py). */
static void explain(tls_conn_t *t, int s, int err, int saved_errno) {
    char why[REASON_MAX];
    unsigned long e = ERR_peek_error();
    long verify = SSL_get_verify_result(t->ssl[s]);
    if (err == SSL_ERROR_SSL && ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED &&
            verify != X509_V_OK) {
        snprintf(why, sizeof(why), "certificate verify failed: %s",
                 X509_verify_cert_error_string(verify));
    } else if (err == SSL_ERROR_SSL && e != 0) {
        const char *r = ERR_reason_error_string(e);
        snprintf(why, sizeof(why), "%s", r != NULL ? r : "TLS protocol error");
    } else if (err == SSL_ERROR_SYSCALL && saved_errno != 0) {
        snprintf(why, sizeof(why), "%s", strerror(saved_errno));
    } else {
        snprintf(why, sizeof(why), "the peer closed the connection during the handshake");
    }
    tls_fail(t, s, why);
    ERR_clear_error();
}

int tls_handshake(tls_conn_t *t) {
    for (int s = 0; s < 2; s++) {
        SSL *ssl = t->ssl[s];
        if (ssl == NULL || t->hs_done[s])
            continue;
        ERR_clear_error();
        errno = 0;
        int r = SSL_do_handshake(ssl);
        if (r == 1) {
            t->hs_done[s] = 1;
            t->hs_want[s] = 0;
            continue;
        }
        int saved = errno, err = SSL_get_error(ssl, r);
        if (err == SSL_ERROR_WANT_READ) {
            t->hs_want[s] = EPOLLIN;
        } else if (err == SSL_ERROR_WANT_WRITE) {
            t->hs_want[s] = EPOLLOUT;
        } else {
            explain(t, s, err, saved);
            return -1;
        }
    }
    return tls_handshaking(t) ? 0 : 1;
}

/* Reads record after record into buf till it is full or the socket is empty: one
 * send() downstream per batch, not per record. An end met after some bytes is kept
 * for the next call, so a reset is not mistaken for an EOF on the read after. */
ssize_t tls_recv(tls_conn_t *t, int s, char *buf, size_t len) {
    SSL *ssl = t->ssl[s];
    size_t got = 0;
    t->rd_out[s] = 0;
    if (t->rd_end[s]) {
        errno = t->rd_errno[s];
        return t->rd_end[s] == 1 ? 0 : -1;
    }
    while (got < len) {
        size_t n = 0;
        ERR_clear_error();
        errno = 0;
        if (SSL_read_ex(ssl, buf + got, len - got, &n)) {
            got += n;
            if (s == 1 && !t->sess_saved && t->sess_key != NULL)
                sess_save(t);
            continue;
        }
        int saved = errno, err = SSL_get_error(ssl, 0);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
            t->rd_out[s] = err == SSL_ERROR_WANT_WRITE;
            if (got)
                return (ssize_t)got;
            errno = EAGAIN;
            return -1;
        }
        ERR_clear_error();
        if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && saved == 0)) {
            t->rd_end[s] = 1;
            t->rd_errno[s] = 0;
        } else {
            t->rd_end[s] = 2;
            t->rd_errno[s] = err == SSL_ERROR_SYSCALL ? saved : EPROTO;
        }
        if (got)
            return (ssize_t)got;
        errno = t->rd_errno[s];
        return t->rd_end[s] == 1 ? 0 : -1;
    }
    return (ssize_t)got;
}

/* Partial-write mode hands back each record as it is sent: go on till the socket is
 * full. After a WANT_*, OpenSSL holds the record it began; the engine's retry passes the
 * same bytes from its held copy (a moving buffer is allowed). */
ssize_t tls_send(tls_conn_t *t, int s, const char *buf, size_t len) {
    SSL *ssl = t->ssl[s];
    size_t done = 0;
    t->wr_in[s] = 0;
    for (;;) {
        size_t n = 0;
        ERR_clear_error();
        errno = 0;
        if (SSL_write_ex(ssl, buf + done, len - done, &n)) {
            done += n;
            if (done < len)
                continue;
            return (ssize_t)done;
        }
        break;
    }
    int saved = errno, err = SSL_get_error(ssl, 0);
    ERR_clear_error();
    if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
        t->wr_in[s] = err == SSL_ERROR_WANT_READ;
        if (done)
            return (ssize_t)done;
        errno = EAGAIN;
        return -1;
    }
    if (done)
        return (ssize_t)done;  /* the error comes back on the retry */
    errno = err == SSL_ERROR_SYSCALL && saved != 0 ? saved : EPIPE;
    return -1;
}

int tls_pending(const tls_conn_t *t, int side) {
    return t != NULL && t->ssl[side] != NULL && !t->rd_end[side] && SSL_pending(t->ssl[side]) > 0;
}

uint32_t tls_want(const tls_conn_t *t, int side) {
    if (t == NULL || t->ssl[side] == NULL)
        return 0;
    if (!t->hs_done[side])
        return t->hs_want[side];
    return (t->rd_out[side] ? EPOLLOUT : 0) | (t->wr_in[side] ? EPOLLIN : 0);
}

int tls_read_wants_out(const tls_conn_t *t, int side) {
    return t != NULL && t->rd_out[side];
}

int tls_write_wants_in(const tls_conn_t *t, int side) {
    return t != NULL && t->wr_in[side];
}

void tls_close_notify(tls_conn_t *t, int side) {
    if (t == NULL || t->ssl[side] == NULL || !t->hs_done[side] || t->notified[side])
        return;
    t->notified[side] = 1;
    ERR_clear_error();
    SSL_shutdown(t->ssl[side]);  /* one alert record; if the socket is full, a bare FIN */
    ERR_clear_error();
}

int tls_resumed(const tls_conn_t *t, int side) {
    return t != NULL && t->ssl[side] != NULL && t->hs_done[side] &&
           SSL_session_reused(t->ssl[side]);
}

/* -- handshake outcomes, for Python ---------------------------------------------- */

static tls_failure_t *book_add(tls_book_t **book) {
    tls_book_t *b = *book;
    if (b == NULL && (b = *book = calloc(1, sizeof(*b))) == NULL)
        return NULL;
    if (b->n == b->cap) {
        if (b->cap >= 4096)
            return NULL;  /* Python reaps far sooner; a burst past this is not told each */
        uint32_t cap = b->cap ? b->cap * 2 : 8;
        tls_failure_t *v = realloc(b->v, cap * sizeof(*v));
        if (v == NULL)
            return NULL;
        b->v = v;
        b->cap = cap;
    }
    return &b->v[b->n++];
}

void tls_note(tls_book_t **book, uint32_t slot, const tls_conn_t *t) {
    if (t == NULL || t->reason == NULL)
        return;
    tls_failure_t *f = book_add(book);
    if (f == NULL)
        return;
    f->slot = slot;
    f->side = t->fail_side;
    f->not_after = 0;
    snprintf(f->reason, sizeof(f->reason), "%s", t->reason);
}

/* The certificate expiry gauge's peer legs (proxy/tls.py): the notAfter of what each
 * leg's peer showed -- the node's, and a client's under mutual TLS. */
int tls_note_peers(tls_book_t **book, uint32_t slot, const tls_conn_t *t) {
    int noted = 0;
    for (int s = 0; t != NULL && s < 2; s++) {
        if (t->ssl[s] == NULL || !t->hs_done[s])
            continue;
        X509 *peer = SSL_get0_peer_certificate(t->ssl[s]);
        struct tm tm;
        if (peer == NULL || !ASN1_TIME_to_tm(X509_get0_notAfter(peer), &tm))
            continue;
        tls_failure_t *f = book_add(book);
        if (f == NULL)
            break;
        f->slot = slot;
        f->side = s;
        f->not_after = (double)timegm(&tm);
        f->reason[0] = 0;
        noted = 1;
    }
    return noted;
}

PyObject *tls_take(tls_book_t **book) {
    PyObject *out = PyList_New(0);
    tls_book_t *b = *book;
    if (out == NULL || b == NULL)
        return out;
    for (uint32_t k = 0; k < b->n; k++) {
        tls_failure_t *f = &b->v[k];
        PyObject *item = f->reason[0] ? Py_BuildValue("(Iisd)", f->slot, f->side, f->reason, 0.0)
                                      : Py_BuildValue("(IiOd)", f->slot, f->side, Py_None,
                                                      f->not_after);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    b->n = 0;
    if (b->cap > 64) {
        free(b->v);
        b->v = NULL;
        b->cap = 0;
    }
    return out;
}

void tls_book_free(tls_book_t **book) {
    if (*book != NULL) {
        free((*book)->v);
        free(*book);
        *book = NULL;
    }
}

/* -- module functions ------------------------------------------------------------ */

/* same_libssl(path_of__ssl) -> bool: CPython's _ssl resolves SSL_CTX_new to the very
 * function this module calls, so an SSL_CTX of its making is one of ours. */
static PyObject *same_libssl(PyObject *mod, PyObject *arg) {
    const char *path = PyUnicode_AsUTF8(arg);
    if (path == NULL)
        return NULL;
    void *h = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (h == NULL)
        Py_RETURN_FALSE;
    void *theirs = dlsym(h, "SSL_CTX_new");
    dlclose(h);
    return PyBool_FromLong(theirs != NULL && theirs == (void *)&SSL_CTX_new);
}

/* ctx_probe(ctx) -> (verify_mode, min_proto_version): what the SSL_CTX under an
 * ssl.SSLContext says, to check at import that the layout is the one expected. */
static PyObject *ctx_probe(PyObject *mod, PyObject *arg) {
    SSL_CTX *ctx = ctx_of(arg);
    if (ctx == NULL)
        return NULL;
    return Py_BuildValue("(il)", SSL_CTX_get_verify_mode(ctx),
                         (long)SSL_CTX_get_min_proto_version(ctx));
}

static PyMethodDef tls_methods[] = {
    {"same_libssl", same_libssl, METH_O, "Whether _ssl at this path uses our libssl."},
    {"ctx_probe", ctx_probe, METH_O, "(verify_mode, min_proto_version) of an SSLContext."},
    {NULL, NULL, 0, NULL},
};

int tls_module_add(PyObject *m) {
    if (PyModule_AddFunctions(m, tls_methods) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "TLS", 1) < 0)
        return -1;
    return PyModule_AddObject(m, "OPENSSL_VERSION_NUMBER",
                              PyLong_FromUnsignedLong(OpenSSL_version_num()));
}

#endif
