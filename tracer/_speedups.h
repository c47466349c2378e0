/* What the other compiled parts of commlens may use of tracer/_speedups.c:
 * the layout of a TraceContext, so that a per-request path (the WSGI
 * middleware's) makes and reads one without a Python attribute look-up.
 *
 * context.TraceContext is a Python subclass with no fields of its own
 * (__slots__ = ()), so its instances have exactly this layout; a user
 * checks that once (commlens_is_trace_context_type) before relying on it.
 */

#ifndef COMMLENS_SPEEDUPS_H
#define COMMLENS_SPEEDUPS_H

#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *trace_id;      /* None until drawn (context.py: ensure_ids) */
    PyObject *span_id;       /* None until drawn */
    PyObject *parent_id;
    PyObject *sampled;       /* a bool */
    PyObject *child_failed;  /* a bool */
    PyObject *service;
} CommlensTraceContext;

/* A new trace's first hop, its ids not drawn: TraceContext(). */
static inline PyObject *
commlens_trace_context_new(PyTypeObject *type)
{
    CommlensTraceContext *self = (CommlensTraceContext *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->trace_id = Py_NewRef(Py_None);
    self->span_id = Py_NewRef(Py_None);
    self->parent_id = Py_NewRef(Py_None);
    self->sampled = Py_NewRef(Py_True);
    self->child_failed = Py_NewRef(Py_False);
    self->service = Py_NewRef(Py_None);
    return (PyObject *)self;
}

/* Whether ``type`` makes objects of exactly this layout. */
static inline int
commlens_is_trace_context_type(PyTypeObject *type, PyTypeObject *base)
{
    return PyType_IsSubtype(type, base) && type->tp_basicsize == base->tp_basicsize
        && type->tp_itemsize == 0 && type->tp_dictoffset == 0;
}

#endif
