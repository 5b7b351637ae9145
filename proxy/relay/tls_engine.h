/* TLS in the engine thread: the record layer of a connection's TLS leg(s), done with
 * OpenSSL from C on the SSL_CTX of Python's own ssl.SSLContext (proxy/tls.py builds it,
 * so configuration, reload and verification stay in one place; docs/hot-loop.md).
 *
 * The engine (engine.h) calls these from its hooks: add() builds the state, handle()
 * drives the handshake without blocking, the copy path reads and writes through it,
 * rewatch() asks which epoll events the TLS layer waits for, finish() frees it.
 *
 * Built only with -DCACHEPORT_TLS (the proxy.relay._engine_tls module, linked with
 * libssl); the plain proxy.relay._engine has none of it and never sees a TLS listener.
 */
#ifndef CACHEPORT_TLS_ENGINE_H
#define CACHEPORT_TLS_ENGINE_H

#ifdef CACHEPORT_TLS

#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct tls_conn tls_conn_t;
typedef struct tls_book tls_book_t;

/* Under the GIL. spec: (server_ctx | None, client_ctx | None, verify_name | None,
 * sni | None): side 0 (client) is terminated with server_ctx, side 1 (upstream) is
 * originated with client_ctx. NULL with an exception set on bad input. */
tls_conn_t *tls_conn_new(PyObject *spec, int cfd, int ufd);
void tls_free(tls_conn_t *t);

int tls_on(const tls_conn_t *t, int side);      /* side speaks TLS */
int tls_handshaking(const tls_conn_t *t);       /* some side has not finished */
/* Step every unfinished handshake: 1 all done, 0 not yet, -1 failed (tls_failure()). */
int tls_handshake(tls_conn_t *t);
/* Read plaintext: > 0 bytes, 0 end of stream, -1 with errno (EAGAIN: try later). */
ssize_t tls_recv(tls_conn_t *t, int side, char *buf, size_t len);
/* Write plaintext: bytes taken (> 0), or -1 with errno (EAGAIN: retry the same bytes). */
ssize_t tls_send(tls_conn_t *t, int side, const char *buf, size_t len);
int tls_pending(const tls_conn_t *t, int side);   /* decrypted bytes wait in the SSL */
uint32_t tls_want(const tls_conn_t *t, int side); /* EPOLLIN/OUT the TLS layer waits for */
int tls_read_wants_out(const tls_conn_t *t, int side);
int tls_write_wants_in(const tls_conn_t *t, int side);
void tls_close_notify(tls_conn_t *t, int side);   /* before a half-close: best effort */
void tls_fail(tls_conn_t *t, int side, const char *why);
const char *tls_failure(const tls_conn_t *t, int *side);
int tls_resumed(const tls_conn_t *t, int side);

/* Handshake outcomes for Python, under the engine's lock: failures (counted and logged
 * there), and the notAfter of the peers' certificates (whether any was noted). */
void tls_note(tls_book_t **book, uint32_t slot, const tls_conn_t *t);
int tls_note_peers(tls_book_t **book, uint32_t slot, const tls_conn_t *t);
/* [(slot, side, reason | None, peer's notAfter)] and empties the book */
PyObject *tls_take(tls_book_t **book);
void tls_book_free(tls_book_t **book);

int tls_module_add(PyObject *m);  /* ctx_probe(), same_libssl(), constants */

#else  /* the plain engine: no connection has TLS state, these are never reached */

#include <Python.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct tls_conn tls_conn_t;
typedef struct tls_book tls_book_t;

static inline tls_conn_t *tls_conn_new(PyObject *spec, int cfd, int ufd) {
    PyErr_SetString(PyExc_ValueError, "this engine was built without TLS");
    return NULL;
}
static inline void tls_free(tls_conn_t *t) {}
static inline int tls_on(const tls_conn_t *t, int side) { return 0; }
static inline int tls_handshaking(const tls_conn_t *t) { return 0; }
static inline int tls_handshake(tls_conn_t *t) { return 1; }
static inline ssize_t tls_recv(tls_conn_t *t, int side, char *buf, size_t len) { return -1; }
static inline ssize_t tls_send(tls_conn_t *t, int side, const char *buf, size_t len) {
    return -1;
}
static inline int tls_pending(const tls_conn_t *t, int side) { return 0; }
static inline uint32_t tls_want(const tls_conn_t *t, int side) { return 0; }
static inline int tls_read_wants_out(const tls_conn_t *t, int side) { return 0; }
static inline int tls_write_wants_in(const tls_conn_t *t, int side) { return 0; }
static inline void tls_close_notify(tls_conn_t *t, int side) {}
static inline void tls_fail(tls_conn_t *t, int side, const char *why) {}
static inline int tls_resumed(const tls_conn_t *t, int side) { return 0; }
static inline void tls_note(tls_book_t **book, uint32_t slot, const tls_conn_t *t) {}
static inline int tls_note_peers(tls_book_t **book, uint32_t slot, const tls_conn_t *t) {
    return 0;
}
static inline PyObject *tls_take(tls_book_t **book) { return PyList_New(0); }
static inline void tls_book_free(tls_book_t **book) {}
static inline int tls_module_add(PyObject *m) { return 0; }

#endif
#endif
