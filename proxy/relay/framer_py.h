/* Python types over the framer and the node map (framer_py.c): NodeMap, which Python
 * swaps after each topology refresh and hands to Engine.add, and Framer, the sans-IO
 * framer itself for tests and the differential fuzz. */
#ifndef CACHEPORT_FRAMER_PY_H
#define CACHEPORT_FRAMER_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "nodemap.h"

int framer_py_add(PyObject *module);
/* The node map of a NodeMap object (a borrowed pointer), or NULL with TypeError set. */
nodemap_t *framer_py_nodemap(PyObject *o);

#endif
