/* What the other compiled parts of commlens (middleware/_*.c) share with
 * tracer/_speedups.c: the layout of a TraceContext, so that a per-request
 * path makes and reads one without a Python attribute look-up; recording
 * through a recorder's compiled methods; handing commlens's own errors
 * over to Python; the clock; an optional attribute look-up; and Python
 * 3.12's single-object exception API on 3.10 and 3.11.
 *
 * context.TraceContext is a Python subclass with no fields of its own
 * (__slots__ = ()), so its instances have exactly this layout; a user
 * checks that once (commlens_is_trace_context_type) before relying on it.
 */

#ifndef COMMLENS_SPEEDUPS_H
#define COMMLENS_SPEEDUPS_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* Member definitions by their 3.12 names (structmember.h's T_OBJECT is
 * deprecated: it reads a NULL field as None but lets Python delete one). */
#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_READONLY READONLY
#endif

/* What each compiled module declares of its multi-phase init, beside its
 * Py_mod_exec slot (tracer/_speedups.c says why):
 * - any number of interpreters, each with its own module state, but only
 *   interpreters that share the main GIL (mod_wsgi's): the ids' generator
 *   in tracer/_speedups.c is one per process, changed under that GIL, and the
 *   middleware's modules read _speedups' objects. In an interpreter with its
 *   own GIL they refuse to import and commlens runs its Python twins there.
 * - the GIL: their updates (a counter's, a request's fields, a send ended
 *   once) are atomic because they run under it; nothing is checked
 *   free-threaded, so a free-threaded CPython turns the GIL back on. */
#ifdef Py_mod_multiple_interpreters
#define COMMLENS_SLOT_INTERPRETERS \
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_SUPPORTED},
#else
#define COMMLENS_SLOT_INTERPRETERS
#endif
#ifdef Py_mod_gil
#define COMMLENS_SLOT_GIL {Py_mod_gil, Py_MOD_GIL_USED},
#else
#define COMMLENS_SLOT_GIL
#endif

#if PY_VERSION_HEX < 0x030B0000
/* The module of the first class along ``type``'s MRO made from ``def``'s
 * module (3.11's; the middleware's Python subclasses reach their module's
 * state through it): borrowed, or NULL and a TypeError. */
static inline PyObject *
PyType_GetModuleByDef(PyTypeObject *type, PyModuleDef *def)
{
    PyObject *mro = type->tp_mro;
    for (Py_ssize_t i = 0; mro != NULL && i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *super = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!(super->tp_flags & Py_TPFLAGS_HEAPTYPE))
            continue;
        PyObject *module = ((PyHeapTypeObject *)super)->ht_module;
        if (module != NULL && PyModule_GetDef(module) == def)
            return module;
    }
    PyErr_Format(PyExc_TypeError, "PyType_GetModuleByDef: no superclass of '%s' has the "
                 "given module", type->tp_name);
    return NULL;
}
#endif

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

/* A read-only attribute for the object field at offset ``closure``
 * (a PyGetSetDef getter): None while the field is unset, as the deprecated
 * T_OBJECT read it, without letting Python delete or replace it. */
static inline PyObject *
commlens_get_field(PyObject *self, void *closure)
{
    PyObject *value = *(PyObject **)((char *)self + (intptr_t)closure);
    return Py_NewRef(value != NULL ? value : Py_None);
}

#define COMMLENS_READONLY_FIELD(name, type, field) \
    {name, (getter)commlens_get_field, NULL, NULL, (void *)offsetof(type, field)}

/* Whether ``type`` makes objects of exactly this layout. */
static inline int
commlens_is_trace_context_type(PyTypeObject *type, PyTypeObject *base)
{
    return PyType_IsSubtype(type, base) && type->tp_basicsize == base->tp_basicsize
        && type->tp_itemsize == 0 && type->tp_dictoffset == 0;
}

/* What a compiled path holds of a recorder (tracer/recorder.py): its
 * inc, observe and keeps_hop, which live as long as it does. */
typedef struct {
    PyObject *inc;
    PyObject *observe;
    PyObject *keeps_hop;
} CommlensRecording;

static inline int
commlens_recording_init(CommlensRecording *recording, PyObject *recorder)
{
    PyObject *inc = PyObject_GetAttrString(recorder, "inc");
    PyObject *observe = inc ? PyObject_GetAttrString(recorder, "observe") : NULL;
    PyObject *keeps_hop = observe ? PyObject_GetAttrString(recorder, "keeps_hop") : NULL;
    if (keeps_hop == NULL) {
        Py_XDECREF(inc);
        Py_XDECREF(observe);
        return -1;
    }
    Py_XSETREF(recording->inc, inc);
    Py_XSETREF(recording->observe, observe);
    Py_XSETREF(recording->keeps_hop, keeps_hop);
    return 0;
}

#define COMMLENS_RECORDING_VISIT(recording) \
    do { Py_VISIT((recording).inc); Py_VISIT((recording).observe); \
         Py_VISIT((recording).keeps_hop); } while (0)
#define COMMLENS_RECORDING_CLEAR(recording) \
    do { Py_CLEAR((recording).inc); Py_CLEAR((recording).observe); \
         Py_CLEAR((recording).keeps_hop); } while (0)

/* inc(name, labels) (``value`` NULL) or observe(name, labels, value)
 * through the held method. Steals ``labels``, a new tuple or NULL (an error
 * is set then). 0, or -1 and an error. */
static inline int
commlens_record(PyObject *method, PyObject *name, PyObject *labels, PyObject *value)
{
    if (labels == NULL)
        return -1;
    PyObject *args[] = {NULL, name, labels, value};
    PyObject *result = PyObject_Vectorcall(
        method, args + 1, (value ? 3 : 2) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(labels);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* keeps_hop(trace_id, duration, flagged): 1 (ship it), 0, or -1. */
static inline int
commlens_keeps_hop(CommlensRecording *recording, PyObject *trace_id, PyObject *duration,
                   PyObject *flagged)
{
    PyObject *args[] = {NULL, trace_id, duration, flagged};
    PyObject *result = PyObject_Vectorcall(recording->keeps_hop, args + 1,
                                           3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (result == NULL)
        return -1;
    int keep = PyObject_IsTrue(result);
    Py_DECREF(result);
    return keep;
}

/* The label of an RPC method name: one remembered in ``seen``
 * (labels.method.seen) as it is, else ``label(raw)`` (labels.method). */
static inline PyObject *
commlens_method_label(PyObject *seen, PyObject *label, PyObject *raw)
{
    if (PyUnicode_CheckExact(raw)) {
        int known = PySet_Contains(seen, raw);
        if (known != 0)
            return known < 0 ? NULL : Py_NewRef(raw);
    }
    return PyObject_CallOneArg(label, raw);
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

/* The set of method names labels.method has found valid (its ``seen``),
 * read by the compiled RPC paths before calling it; a new reference, or
 * NULL and an error. */
static inline PyObject *
commlens_method_seen(PyObject *method_label)
{
    PyObject *seen = PyObject_GetAttrString(method_label, "seen");
    if (seen != NULL && !PySet_CheckExact(seen)) {
        Py_DECREF(seen);
        PyErr_SetString(PyExc_TypeError, "method_label.seen is not a set");
        return NULL;
    }
    return seen;
}

/* commlens's own error, pending now, goes to ``hook`` (Python that counts
 * it as dropped and logs it at debug level) and no further: the service
 * never sees it. ``first``, unless NULL, is passed before the exception.
 *
 * Only an Exception is commlens's own error. Anything else that arrives
 * while commlens records (a KeyboardInterrupt raised by a signal handler
 * that ran inside a callback, a SystemExit) is the service's signal, not a
 * recording failure: it is not counted, stays pending, and the caller
 * propagates it unchanged, as the Python twins' ``except Exception`` lets it
 * through (tests/test_differential.py). 0: handed over, nothing pending;
 * -1: the service's signal is pending. */
static inline int
commlens_hand_over_error(PyObject *hook, PyObject *first)
{
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *error = PyErr_GetRaisedException();
    PyObject *args[] = {NULL, first, error ? error : Py_None};
    PyObject *result = first != NULL
        ? PyObject_Vectorcall(hook, args + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
        : PyObject_Vectorcall(hook, args + 2, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_XDECREF(error);
    if (result == NULL) {
        /* The hook's own failure is dropped too; a signal during it is not. */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyErr_Clear();
    }
    Py_XDECREF(result);
    return 0;
}

/* A service's signal (commlens_hand_over_error: -1) raised while
 * ``pending``, an exception of the service's own or NULL, was on its way:
 * the signal goes on, ``pending`` as its context (as a Python ``finally``
 * that raises chains them). Steals ``pending``. */
static inline void
commlens_raise_over(PyObject *pending)
{
    if (pending == NULL)
        return;
    PyObject *signal = PyErr_GetRaisedException();
    PyException_SetContext(signal, pending);
    PyErr_SetRaisedException(signal);
}

/* _speedups.TraceContext, the type whose instances have this layout; a
 * new reference, or NULL and an error. */
static inline PyTypeObject *
commlens_trace_context_base(void)
{
    PyObject *speedups = PyImport_ImportModule("commlens.tracer._speedups");
    PyObject *base = speedups ? PyObject_GetAttrString(speedups, "TraceContext") : NULL;
    Py_XDECREF(speedups);
    if (base != NULL && !PyType_Check(base)) {
        Py_DECREF(base);
        PyErr_SetString(PyExc_TypeError, "_speedups.TraceContext is not a type");
        return NULL;
    }
    return (PyTypeObject *)base;
}

/* 0 if ``type`` (context.TraceContext, given to a compiled path) makes
 * objects of this layout; -1 and a TypeError if not. */
static inline int
commlens_check_trace_context_type(PyObject *type)
{
    PyTypeObject *base = commlens_trace_context_base();
    if (base == NULL)
        return -1;
    int same_layout = PyType_Check(type)
        && commlens_is_trace_context_type((PyTypeObject *)type, base);
    Py_DECREF(base);
    if (!same_layout) {
        PyErr_SetString(PyExc_TypeError,
                        "trace_context: a subclass of _speedups.TraceContext with no fields");
        return -1;
    }
    return 0;
}

#endif
