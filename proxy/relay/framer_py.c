/* NodeMap and Framer for Python (framer_py.h). Nothing here runs on the hot path. */
#include "framer_py.h"

#include "resp_framer.h"

typedef struct {
    PyObject_HEAD
    nodemap_t *m;
} NodeMapObject;

/* NodeMap(memcache=False): memcache, the connections it is given frame Memcached. */
static PyObject *NodeMap_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"memcache", NULL};
    int mc = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", names, &mc))
        return NULL;
    NodeMapObject *o = (NodeMapObject *)type->tp_alloc(type, 0);
    if (o == NULL)
        return NULL;
    o->m = nm_new();
    if (o->m == NULL) {
        Py_DECREF(o);
        return PyErr_NoMemory();
    }
    o->m->mc = (uint8_t)mc;
    return (PyObject *)o;
}

static void NodeMap_dealloc(NodeMapObject *o) {
    nm_unref(o->m);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

/* swap([(host: bytes, port: int, announced: bytes "host:port"), ...]) */
static PyObject *NodeMap_swap(NodeMapObject *o, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "swap() takes a sequence of (host, port, announced)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    const char **hosts = calloc(n ? n : 1, sizeof(*hosts));
    const char **outs = calloc(n ? n : 1, sizeof(*outs));
    size_t *hl = calloc(n ? n : 1, sizeof(*hl)), *ol = calloc(n ? n : 1, sizeof(*ol));
    unsigned *ports = calloc(n ? n : 1, sizeof(*ports));
    PyObject *r = NULL;
    if (!hosts || !outs || !hl || !ol || !ports) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t a, b;
        unsigned int port;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "y#Iy#", &hosts[i], &a, &port,
                              &outs[i], &b))
            goto out;
        hl[i] = (size_t)a;
        ol[i] = (size_t)b;
        ports[i] = port;
    }
    if (nm_swap(o->m, (size_t)n, hosts, hl, ports, outs, ol) < 0) {
        PyErr_NoMemory();
        goto out;
    }
    r = Py_None;
    Py_INCREF(r);
out:
    free(hosts);
    free(outs);
    free(hl);
    free(ol);
    free(ports);
    Py_DECREF(seq);
    return r;
}

static Py_ssize_t NodeMap_len(NodeMapObject *o) { return (Py_ssize_t)nm_size(o->m); }

static PyObject *NodeMap_lookup(NodeMapObject *o, PyObject *args) {
    const char *host;
    Py_ssize_t hlen;
    unsigned int port;
    char out[512];
    if (!PyArg_ParseTuple(args, "y#I", &host, &hlen, &port))
        return NULL;
    int m = nm_lookup(o->m, host, (size_t)hlen, port, out, sizeof(out));
    if (m < 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(out, m);
}

static PyMethodDef NodeMap_methods[] = {
    {"swap", (PyCFunction)NodeMap_swap, METH_O, "Replace the whole table."},
    {"lookup", (PyCFunction)NodeMap_lookup, METH_VARARGS, "host, port -> b'announce:port'."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods NodeMap_seq = {.sq_length = (lenfunc)NodeMap_len};

static PyTypeObject NodeMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy.relay._engine.NodeMap",
    .tp_basicsize = sizeof(NodeMapObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A cluster's node map: internal (host, port) -> b'announce:port' "
              "(NodeMap(memcache=True): a Memcached cluster's, empty).",
    .tp_new = NodeMap_new,
    .tp_dealloc = (destructor)NodeMap_dealloc,
    .tp_methods = NodeMap_methods,
    .tp_as_sequence = &NodeMap_seq,
};

nodemap_t *framer_py_nodemap(PyObject *o) {
    if (!PyObject_TypeCheck(o, &NodeMapType)) {
        PyErr_SetString(PyExc_TypeError, "expected a NodeMap");
        return NULL;
    }
    return ((NodeMapObject *)o)->m;
}

/* -- Framer: the sans-IO framer, for tests ---------------------------------------- */

typedef struct {
    PyObject_HEAD
    rf_t f;
    nodemap_t *m;
} FramerObject;

/* Framer(nodemap=None, memcache=False) */
static int Framer_init(FramerObject *o, PyObject *args, PyObject *kw) {
    static char *names[] = {"nodemap", "memcache", NULL};
    PyObject *map = Py_None;
    int mc = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|Op", names, &map, &mc))
        return -1;
    rf_free(&o->f);
    nm_unref(o->m);
    o->m = NULL;
    if (map != Py_None) {
        o->m = framer_py_nodemap(map);
        if (o->m == NULL)
            return -1;
        nm_ref(o->m);
    }
    rf_init(&o->f, o->m ? nm_lookup : NULL, o->m);
    rf_protocol(&o->f, mc);
    return 0;
}

static void Framer_dealloc(FramerObject *o) {
    rf_free(&o->f);
    nm_unref(o->m);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyObject *Framer_feed_request(FramerObject *o, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    rf_request(&o->f, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static int append(PyObject *list, PyObject *item) {
    if (item == NULL)
        return -1;
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

/* feed_reply(data) -> [("fwd", bytes) | ("emit", bytes, redirect) |
 *                      ("ask", kind, frame, spec) | ("error",)] */
static PyObject *Framer_feed_reply(FramerObject *o, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    const char *p = b.buf;
    size_t n = (size_t)b.len, off = 0;
    if (out == NULL)
        goto fail;
    do {
        rf_out_t r;
        int act;
        size_t used = rf_reply(&o->f, p + off, n - off, &r, &act);
        if (r.fwd && append(out, Py_BuildValue("(sy#)", "fwd", p + off, (Py_ssize_t)r.fwd)) < 0)
            goto fail;
        if (act == RF_ERROR) {
            if (append(out, Py_BuildValue("(s)", "error")) < 0)
                goto fail;
            break;
        }
        if (act == RF_EMIT && append(out, Py_BuildValue("(sy#O)", "emit", r.data,
                                                        (Py_ssize_t)r.len,
                                                        r.redirect ? Py_True : Py_False)) < 0)
            goto fail;
        if (act == RF_ASK && append(out, Py_BuildValue("(siy#y#)", "ask", r.ask, r.data,
                                                       (Py_ssize_t)r.len, r.spec,
                                                       (Py_ssize_t)r.speclen)) < 0)
            goto fail;
        off += used;
    } while (off < n);
    rf_release(&o->f);
    PyBuffer_Release(&b);
    return out;
fail:
    rf_release(&o->f);
    Py_XDECREF(out);
    PyBuffer_Release(&b);
    return NULL;
}

static PyObject *Framer_state(FramerObject *o, PyObject *unused) {
    return Py_BuildValue("{s:n,s:K,s:i,s:i,s:i,s:i,s:i,s:K}", "held", (Py_ssize_t)rf_held(&o->f),
                         "pending", (unsigned long long)rf_pending(&o->f),
                         "special", (int)o->f.special,
                         "opaque", (int)o->f.opaque, "request_error", (int)o->f.request_error,
                         "protocol", (int)o->f.protocol, "in_multi", (int)o->f.in_multi,
                         "redirects", (unsigned long long)o->f.redirects);
}

static PyMethodDef Framer_methods[] = {
    {"feed_request", (PyCFunction)Framer_feed_request, METH_O, "Note a client chunk."},
    {"feed_reply", (PyCFunction)Framer_feed_reply, METH_O, "Frame a node chunk: decisions."},
    {"state", (PyCFunction)Framer_state, METH_NOARGS, "Counters and flags (tests)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FramerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy.relay._engine.Framer",
    .tp_basicsize = sizeof(FramerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The engine's RESP framer without sockets (tests, the differential fuzz).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Framer_init,
    .tp_dealloc = (destructor)Framer_dealloc,
    .tp_methods = Framer_methods,
};

int framer_py_add(PyObject *m) {
    if (PyType_Ready(&NodeMapType) < 0 || PyType_Ready(&FramerType) < 0)
        return -1;
    Py_INCREF(&NodeMapType);
    if (PyModule_AddObject(m, "NodeMap", (PyObject *)&NodeMapType) < 0) {
        Py_DECREF(&NodeMapType);
        return -1;
    }
    Py_INCREF(&FramerType);
    if (PyModule_AddObject(m, "Framer", (PyObject *)&FramerType) < 0) {
        Py_DECREF(&FramerType);
        return -1;
    }
    return 0;
}
