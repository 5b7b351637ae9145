/* The native relay engine's Python type (engine.h says what the engine is and which
 * file does what): Engine's methods, under the GIL and the engine's lock, the start
 * and stop of its thread, and the module. */
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
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "engine.h"
#include "framer_py.h"

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
    /* The defaults are proxy/relay/pipes.py's; relay/engine.py passes them from there. */
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

/* slot_conn() for a call that changes the connection: while the thread runs its
 * handshake step outside the lock, wait with the lock dropped and the GIL released (a
 * step is bounded: one SSL_do_handshake on a non-blocking socket). */
static conn_t *settled_conn(Engine *e, Py_ssize_t slot) {
    conn_t *c = slot_conn(e, slot);
    while (c != NULL && c->stepping) {
        pthread_mutex_unlock(&e->lock);
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
        pthread_mutex_lock(&e->lock);
        c = slot_conn(e, slot);
    }
    return c;
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
    conn_t *c = settled_conn(e, slot);
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
    int busy = c != NULL && c->state == LIVE && c->tls != NULL &&
               (c->stepping || tls_handshaking(c->tls));
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
    "The native relay engine (Linux): see proxy/relay/engine.py.", -1, NULL,
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

#else  /* not Linux: the module imports and says so; proxy/relay/engine.py falls back */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, ENGINE_MODULE, "Not built: needs Linux (epoll, splice).", -1, NULL,
};

PyMODINIT_FUNC ENGINE_INIT(void) {
    PyErr_SetString(PyExc_ImportError, ENGINE_MODULE " needs Linux");
    return NULL;
}

#endif
