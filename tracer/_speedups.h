/* What the other compiled parts of commlens (middleware/_*.c) share with
 * tracer/_speedups.c: the layout of a TraceContext, so that a per-request
 * path makes and reads one without a Python attribute look-up; the clock;
 * an optional attribute look-up; and Python 3.12's single-object exception
 * API on 3.10 and 3.11.
 *
 * context.TraceContext is a Python subclass with no fields of its own
 * (__slots__ = ()), so its instances have exactly this layout; a user
 * checks that once (commlens_is_trace_context_type) before relying on it.
 */

#ifndef COMMLENS_SPEEDUPS_H
#define COMMLENS_SPEEDUPS_H

#include <Python.h>
#include <time.h>

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

/* Seconds on time.perf_counter()'s clock (CLOCK_MONOTONIC on Linux): a
 * duration measured here can be set against the Python side's. */
static inline double
commlens_monotonic(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* getattr(obj, name, None) without the AttributeError's cost to the
 * caller: 1 and a new reference, 0 (absent), or -1 and an error. */
static inline int
commlens_optional_attr(PyObject *obj, PyObject *name, PyObject **result)
{
    *result = PyObject_GetAttr(obj, name);
    if (*result != NULL)
        return 1;
    if (!PyErr_ExceptionMatches(PyExc_AttributeError))
        return -1;
    PyErr_Clear();
    return 0;
}

#if PY_VERSION_HEX < 0x030C0000
static inline PyObject *
PyErr_GetRaisedException(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (type == NULL)
        return NULL;
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

static inline void
PyErr_SetRaisedException(PyObject *exc)
{
    if (exc == NULL)
        return;
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
}
#endif

#endif
