/* The WSGI middleware's per-request path, compiled.
 *
 * middleware/wsgi.py is the middleware; this file is only what runs for
 * every request, and wsgi.py says what it does and why. Whatever is rare
 * (a traceparent to parse, an unseen User-Agent, route or status line, a
 * hop to ship, an error) is a call back into wsgi.py's Python, given to
 * bind() once at import.
 *
 * Why C: on a minimal app under a fast server the same path in Python cost
 * about 8 % of the request (docs/benchmarks.md), most of it in making and
 * calling Python objects: the request, its start_response, the list body's
 * close() and finaliser. Here those are C structs and C calls.
 *
 * Every function called with the GIL held, as CPython calls them; nothing
 * here releases it, so a request's fields change under one thread at a time.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "../tracer/_speedups.h"

/* -- the module's state --------------------------------------------------- */

/* One per interpreter that imports commlens (multi-phase init, PEP 489): its
 * types, the strings it reads, and what that interpreter's wsgi.py binds, so
 * the last bind() no longer wins across sub-interpreters (mod_wsgi's). */
#define WSGI_STRINGS(X) \
    X(HTTP_TRACEPARENT, "HTTP_TRACEPARENT") X(HTTP_BAGGAGE, "HTTP_BAGGAGE") \
    X(HTTP_USER_AGENT, "HTTP_USER_AGENT") X(REQUEST_METHOD, "REQUEST_METHOD") \
    X(PATH_INFO, "PATH_INFO") X(SCRIPT_NAME, "SCRIPT_NAME") X(dropped, "dropped") X(bad_context, "bad_context") \
    X(500, "500") X(000, "000")

/* What wsgi.py binds (bind()), NULL until then. */
#define WSGI_BOUND(X) \
    X(trace_context) X(child_of_incoming) X(baggage_caller) X(user_agent_memo) \
    X(caller_from_user_agent) X(status_codes) X(status_code) X(http_methods) \
    X(other_method) X(current) X(hop_metric) X(error_class) X(record_hop) \
    X(recording_failed) X(wrap_iterable)

typedef struct {
    PyTypeObject *middleware_type;
    PyTypeObject *request_type;
    PyTypeObject *list_body_type;
#define FIELD(name, text) PyObject *str_##name;
    WSGI_STRINGS(FIELD)
#undef FIELD
    PyTypeObject *trace_context;  /* context.TraceContext (_speedups.h's layout) */
    PyObject *child_of_incoming;  /* traceparent -> (ctx, valid) */
    PyObject *baggage_caller;     /* (baggage, parent_id) -> caller or None */
    PyObject *user_agent_memo;    /* dict: User-Agent -> caller */
    PyObject *caller_from_user_agent;
    PyObject *status_codes;       /* dict: status line -> code */
    PyObject *status_code;        /* status line -> code, remembering it */
    PyObject *http_methods;       /* frozenset */
    PyObject *other_method;       /* str */
    PyObject *current;            /* ContextVar of the hop being served */
    PyObject *hop_metric;         /* metrics.HTTP_SERVER_HOPS.name */
    PyObject *error_class;        /* exception class name -> label */
    PyObject *record_hop;         /* (request, code, failed, duration, body) */
    PyObject *recording_failed;   /* (recorder, exception) */
    PyObject *wrap_iterable;      /* (body, request) -> _Body */
} WsgiState;

static struct PyModuleDef module_def;

/* -- the middleware's base ------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    /* Its module's, read for every request. Borrowed: the middleware holds
     * its type, whose base holds the module. */
    WsgiState *state;
    PyObject *app;
    PyObject *service;
    PyObject *recorder;
    PyObject *routes;         /* RouteTemplates */
    PyObject *routes_memo;    /* its .remembered dict */
    CommlensRecording recording;
    PyObject *dict;           /* the Python subclass's attributes */
} Middleware;

typedef struct {
    PyObject_HEAD
    Middleware *middleware;
    PyObject *ctx;
    PyObject *caller;
    PyObject *method;
    PyObject *route;
    PyObject *environ;
    PyObject *start_response;
    PyObject *status;
    PyObject *headers;
    PyObject *error;
    double start;
    char done;
} Request;

typedef struct {
    PyListObject list;
    Request *request;
} ListBody;

/* -- Request -------------------------------------------------------------- */

static void
request_clear_fields(Request *self)
{
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->caller);
    Py_CLEAR(self->method);
    Py_CLEAR(self->route);
    Py_CLEAR(self->environ);
    Py_CLEAR(self->start_response);
    Py_CLEAR(self->status);
    Py_CLEAR(self->headers);
    Py_CLEAR(self->error);
}

static void
request_dealloc(Request *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    request_clear_fields(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* The start_response the application gets. */
static PyObject *
request_call(Request *self, PyObject *args, PyObject *kwargs)
{
    PyObject *status, *headers, *exc_info = NULL;
    if (kwargs == NULL && PyTuple_GET_SIZE(args) == 2) {
        status = PyTuple_GET_ITEM(args, 0);
        headers = PyTuple_GET_ITEM(args, 1);
    } else {
        static char *keywords[] = {"status", "headers", "exc_info", NULL};
        if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O:start_response", keywords,
                                         &status, &headers, &exc_info))
            return NULL;
    }
    Py_INCREF(status);
    Py_XSETREF(self->status, status);
    Py_INCREF(headers);
    Py_XSETREF(self->headers, headers);
    return PyObject_Call(self->start_response, args, kwargs);
}

/* The status code label of a status line; a new reference or NULL. */
static PyObject *
status_code(WsgiState *state, PyObject *status)
{
    if (status != NULL && PyUnicode_CheckExact(status)) {
        PyObject *code = PyDict_GetItemWithError(state->status_codes, status);
        if (code != NULL)
            return Py_NewRef(code);
        if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_CallOneArg(state->status_code, status ? status : Py_None);
}

/* 1 if the status code label is a failure's, 0 if not; -1 and an error if
 * it is not a str (status_codes and status_code are Python's). */
static int
is_failed_code(WsgiState *state, PyObject *code)
{
    if (!PyUnicode_Check(code)) {
        PyErr_SetString(PyExc_TypeError, "a status code label is a str");
        return -1;
    }
    if (PyUnicode_GET_LENGTH(code) < 1)
        return 1;
    Py_UCS4 first = PyUnicode_READ_CHAR(code, 0);
    return first == '4' || first == '5'
        || (first == '0' && PyUnicode_Compare(code, state->str_000) == 0);
}

static int
request_record(Request *self, PyObject *body)
{
    double duration = commlens_monotonic() - self->start;
    Middleware *mw = self->middleware;
    WsgiState *state = mw->state;
    PyObject *code = self->error != NULL && self->error != Py_None
        ? Py_NewRef(state->str_500) : status_code(state, self->status);
    if (code == NULL)
        return -1;
    /* Checked before it becomes a label: not a str, nothing is recorded. */
    int failed = is_failed_code(state, code);
    PyObject *duration_obj = failed < 0 ? NULL : PyFloat_FromDouble(duration);
    if (duration_obj == NULL) {
        Py_DECREF(code);
        return -1;
    }
    int result = commlens_record(
        mw->recording.observe, state->hop_metric,
        PyTuple_Pack(5, mw->service, self->caller, self->method, self->route, code),
        duration_obj);
    CommlensTraceContext *ctx = (CommlensTraceContext *)self->ctx;
    int keep = result < 0 ? -1 : commlens_keeps_hop(
        &mw->recording, ctx->trace_id, duration_obj, failed ? Py_True : ctx->child_failed);
    if (keep > 0) {
        PyObject *done = PyObject_CallFunctionObjArgs(
            state->record_hop, (PyObject *)self, code, failed ? Py_True : Py_False,
            duration_obj, body ? body : Py_None, NULL);
        Py_XDECREF(done);
        keep = done == NULL ? -1 : 0;
    }
    Py_DECREF(duration_obj);
    Py_DECREF(code);
    return keep < 0 ? -1 : 0;
}

/* Record the request, once, however it ended. 0, or -1 if the service's
 * signal arrived meanwhile and is pending (commlens_hand_over_error). */
static int
request_finish(Request *self, PyObject *body)
{
    if (self->done)
        return 0;
    self->done = 1;
    Middleware *mw = self->middleware;
    if (request_record(self, body) < 0)
        return commlens_hand_over_error(mw->state->recording_failed, mw->recorder);
    return 0;
}

static PyObject *
request_finish_method(Request *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "finish() takes at most one argument");
        return NULL;
    }
    if (request_finish(self, nargs ? args[0] : NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef request_methods[] = {
    {"finish", (PyCFunction)(void (*)(void))request_finish_method, METH_FASTCALL,
     "Record the request, once, however it ended; the argument: a list body. Raises "
     "only a KeyboardInterrupt or SystemExit that arrived meanwhile."},
    {NULL},
};

/* Tracked by the collector: an application may keep its start_response
 * (this request) in the environ, which the request refers to. */
static int
request_traverse(Request *self, visitproc visit, void *arg)
{
    Py_VISIT(self->middleware);
    Py_VISIT(self->ctx);
    Py_VISIT(self->caller);
    Py_VISIT(self->method);
    Py_VISIT(self->route);
    Py_VISIT(self->environ);
    Py_VISIT(self->start_response);
    Py_VISIT(self->status);
    Py_VISIT(self->headers);
    Py_VISIT(self->error);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
request_clear(Request *self)
{
    request_clear_fields(self);
    return 0;
}

static PyObject *
request_get_done(Request *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->done);
}

static PyObject *
request_get_start(Request *self, void *Py_UNUSED(closure))
{
    return PyFloat_FromDouble(self->start);
}

static PyObject *
request_get_middleware(Request *self, void *Py_UNUSED(closure))
{
    return Py_NewRef((PyObject *)self->middleware);
}

/* The error label: None or a str (the iterator body's wrapper, wsgi._Body,
 * sets it when the body raises); never deleted. */
static int
request_set_error(Request *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || (value != Py_None && !PyUnicode_Check(value))) {
        PyErr_SetString(PyExc_TypeError, "Request.error: a str or None");
        return -1;
    }
    Py_XSETREF(self->error, Py_NewRef(value));
    return 0;
}

static PyGetSetDef request_getset[] = {
    {"done", (getter)request_get_done, NULL, NULL, NULL},
    {"start", (getter)request_get_start, NULL, NULL, NULL},
    {"middleware", (getter)request_get_middleware, NULL, NULL, NULL},
    COMMLENS_READONLY_FIELD("ctx", Request, ctx),
    COMMLENS_READONLY_FIELD("caller", Request, caller),
    COMMLENS_READONLY_FIELD("method", Request, method),
    COMMLENS_READONLY_FIELD("route", Request, route),
    COMMLENS_READONLY_FIELD("environ", Request, environ),
    COMMLENS_READONLY_FIELD("status", Request, status),
    COMMLENS_READONLY_FIELD("headers", Request, headers),
    {"error", (getter)commlens_get_field, (setter)request_set_error, NULL,
     (void *)offsetof(Request, error)},
    {NULL},
};

static PyType_Slot request_slots[] = {
    {Py_tp_doc, (void *)"One request in flight; also the start_response the application "
                        "gets."},
    {Py_tp_dealloc, request_dealloc},
    {Py_tp_traverse, request_traverse},
    {Py_tp_clear, request_clear},
    {Py_tp_call, request_call},
    {Py_tp_methods, request_methods},
    {Py_tp_getset, request_getset},
    {0, NULL},
};

static PyType_Spec request_spec = {
    .name = "commlens.middleware._wsgi_request.Request",
    .basicsize = sizeof(Request),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE
        | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = request_slots,
};

/* A value of the environ, or None: a new reference, NULL only on error.
 * Held, not borrowed: looking a value up in a set or a dict may run the
 * Python of a str subclass, which may change the environ. */
static PyObject *
environ_get(PyObject *environ, PyObject *key)
{
    PyObject *value = PyDict_GetItemWithError(environ, key);
    if (value == NULL && !PyErr_Occurred())
        return Py_NewRef(Py_None);
    return Py_XNewRef(value);
}

/* The caller label: our baggage member, else the User-Agent; new reference.
 * The member names the caller only with the span id of the traceparent
 * (context.parse_baggage_sender), so without one it is not read. */
static PyObject *
request_caller(WsgiState *state, PyObject *environ, CommlensTraceContext *ctx,
               int has_traceparent)
{
    if (has_traceparent && ctx->parent_id != Py_None) {
        PyObject *baggage = environ_get(environ, state->str_HTTP_BAGGAGE);
        if (baggage == NULL)
            return NULL;
        PyObject *caller = baggage == Py_None ? Py_NewRef(Py_None)
            : PyObject_CallFunctionObjArgs(state->baggage_caller, baggage, ctx->parent_id,
                                           NULL);
        Py_DECREF(baggage);
        if (caller == NULL || caller != Py_None)
            return caller;
        Py_DECREF(caller);
    }
    PyObject *user_agent = environ_get(environ, state->str_HTTP_USER_AGENT);
    if (user_agent == NULL)
        return NULL;
    PyObject *caller = Py_XNewRef(PyDict_GetItemWithError(state->user_agent_memo, user_agent));
    if (caller == NULL && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError))  /* an unhashable value */
            PyErr_Clear();
    }
    if (caller == NULL && !PyErr_Occurred())
        caller = PyObject_CallOneArg(state->caller_from_user_agent, user_agent);
    Py_DECREF(user_agent);
    return caller;
}

static Request *
request_new(Middleware *mw, PyObject *environ, PyObject *start_response)
{
    if (!PyDict_Check(environ)) {
        PyErr_SetString(PyExc_TypeError, "environ is not a dict");
        return NULL;
    }
    WsgiState *state = mw->state;
    Request *self = PyObject_GC_New(Request, state->request_type);
    if (self == NULL)
        return NULL;
    self->middleware = (Middleware *)Py_NewRef(mw);
    self->ctx = self->caller = self->method = self->route = NULL;
    self->status = self->headers = self->error = NULL;
    self->environ = Py_NewRef(environ);
    self->start_response = Py_NewRef(start_response);
    self->done = 0;
    PyObject_GC_Track(self);

    PyObject *traceparent = environ_get(environ, state->str_HTTP_TRACEPARENT);
    PyObject *method = NULL, *path = NULL;
    if (traceparent == NULL)
        goto fail;
    if (traceparent == Py_None) {
        self->ctx = commlens_trace_context_new(state->trace_context);
        if (self->ctx == NULL)
            goto fail;
    } else {
        PyObject *parsed = PyObject_CallOneArg(state->child_of_incoming, traceparent);
        if (parsed == NULL)
            goto fail;
        if (!PyTuple_Check(parsed) || PyTuple_GET_SIZE(parsed) != 2) {
            Py_DECREF(parsed);
            PyErr_SetString(PyExc_TypeError, "child_of_incoming: not a pair");
            goto fail;
        }
        self->ctx = Py_NewRef(PyTuple_GET_ITEM(parsed, 0));
        if (Py_TYPE(self->ctx) != state->trace_context) {
            Py_DECREF(parsed);
            PyErr_SetString(PyExc_TypeError, "child_of_incoming: not a TraceContext");
            goto fail;
        }
        int valid = PyObject_IsTrue(PyTuple_GET_ITEM(parsed, 1));
        Py_DECREF(parsed);
        if (valid < 0)
            goto fail;
        if (!valid) {
            PyObject *r = PyObject_CallMethodOneArg(mw->recorder, state->str_dropped,
                                                    state->str_bad_context);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
    }
    Py_SETREF(((CommlensTraceContext *)self->ctx)->service, Py_NewRef(mw->service));
    self->caller = request_caller(state, environ, (CommlensTraceContext *)self->ctx,
                                  traceparent != Py_None);
    if (self->caller == NULL)
        goto fail;

    method = environ_get(environ, state->str_REQUEST_METHOD);
    if (method == NULL)
        goto fail;
    int known = PySet_Contains(state->http_methods, method);
    if (known < 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            goto fail;
        PyErr_Clear();
        known = 0;
    }
    self->method = Py_NewRef(known ? method : state->other_method);

    path = environ_get(environ, state->str_PATH_INFO);
    if (path == NULL)
        goto fail;
    /* The route is of SCRIPT_NAME + PATH_INFO (_wsgi_request_py._route_path
     * says why): a non-empty exact str SCRIPT_NAME goes before an absent or
     * exact str PATH_INFO. */
    PyObject *script = environ_get(environ, state->str_SCRIPT_NAME);
    if (script == NULL)
        goto fail;
    if (PyUnicode_CheckExact(script) && PyUnicode_GET_LENGTH(script) > 0
            && (path == Py_None || PyUnicode_CheckExact(path))) {
        PyObject *full = path == Py_None ? Py_NewRef(script) : PyUnicode_Concat(script, path);
        Py_DECREF(script);
        if (full == NULL)
            goto fail;
        Py_SETREF(path, full);
    } else {
        Py_DECREF(script);
    }
    self->route = Py_XNewRef(PyDict_GetItemWithError(mw->routes_memo, path));
    if (self->route == NULL) {
        if (PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError))
                goto fail;
            PyErr_Clear();
        }
        self->route = PyObject_CallOneArg(mw->routes, path);
        if (self->route == NULL)
            goto fail;
    }
    Py_DECREF(traceparent);
    Py_DECREF(method);
    Py_DECREF(path);
    self->start = commlens_monotonic();
    return self;
fail:
    Py_XDECREF(traceparent);
    Py_XDECREF(method);
    Py_XDECREF(path);
    Py_DECREF(self);
    return NULL;
}

/* -- ListBody ------------------------------------------------------------- */

static PyObject *
list_body_close(ListBody *self, PyObject *Py_UNUSED(unused))
{
    if (self->request != NULL && request_finish(self->request, (PyObject *)self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void
list_body_finalize(ListBody *self)
{
    /* A server that never called close() (werkzeug's development server
     * when the client hung up): the request still ends, once. A signal
     * that arrives meanwhile is reported as unraisable, as from the Python
     * twin's __del__. */
    if (self->request != NULL && !self->request->done) {
        PyObject *exc = PyErr_GetRaisedException();
        if (request_finish(self->request, (PyObject *)self) < 0)
            PyErr_WriteUnraisable((PyObject *)self);
        PyErr_SetRaisedException(exc);
    }
}

/* list_dealloc frees the object; the type, a heap type, is released after
 * it. (list_dealloc's trashcan applies only where it is the type's own
 * tp_dealloc, so it never defers this.) */
static void
list_body_dealloc(ListBody *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return;  /* resurrected */
    PyTypeObject *type = Py_TYPE(self);
    Py_CLEAR(self->request);
    PyList_Type.tp_dealloc((PyObject *)self);
    Py_DECREF(type);
}

static int
list_body_traverse(ListBody *self, visitproc visit, void *arg)
{
    Py_VISIT(self->request);
    Py_VISIT(Py_TYPE(self));
    return PyList_Type.tp_traverse((PyObject *)self, visit, arg);
}

static int
list_body_clear(ListBody *self)
{
    Py_CLEAR(self->request);
    return PyList_Type.tp_clear((PyObject *)self);
}

static PyMethodDef list_body_methods[] = {
    {"close", (PyCFunction)list_body_close, METH_NOARGS, "End the request."},
    {NULL},
};

static PyGetSetDef list_body_getset[] = {
    COMMLENS_READONLY_FIELD("request", ListBody, request),
    {NULL},
};

static PyType_Slot list_body_slots[] = {
    {Py_tp_doc, (void *)"A list body, still a list to the server, with the close() that "
                        "ends the request."},
    {Py_tp_dealloc, list_body_dealloc},
    {Py_tp_finalize, list_body_finalize},
    {Py_tp_traverse, list_body_traverse},
    {Py_tp_clear, list_body_clear},
    {Py_tp_methods, list_body_methods},
    {Py_tp_getset, list_body_getset},
    {0, NULL},
};

static PyType_Spec list_body_spec = {
    .name = "commlens.middleware._wsgi_request.ListBody",
    .basicsize = sizeof(ListBody),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_LIST_SUBCLASS
        | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = list_body_slots,
};

static PyObject *
list_body_new(WsgiState *state, PyObject *items, Request *request)
{
    ListBody *self = (ListBody *)PyType_GenericAlloc(state->list_body_type, 0);
    if (self == NULL)
        return NULL;
    self->request = (Request *)Py_NewRef(request);
    /* The application's list, item for item: list_extend's fast path. */
    if (PyList_SetSlice((PyObject *)self, 0, 0, items) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* -- the middleware's call ------------------------------------------------ */

static PyObject *
middleware_call(Middleware *self, PyObject *args, PyObject *kwargs)
{
    PyObject *environ, *start_response;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "a WSGI application takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "wsgi", 2, 2, &environ, &start_response))
        return NULL;
    if (self->app == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "middleware not initialised");
        return NULL;
    }
    WsgiState *state = self->state;
    Request *request = request_new(self, environ, start_response);
    if (request == NULL) {
        if (commlens_hand_over_error(state->recording_failed, self->recorder) < 0)
            return NULL;
        return PyObject_CallFunctionObjArgs(self->app, environ, start_response, NULL);
    }
    PyObject *token = PyContextVar_Set(state->current, request->ctx);
    if (token == NULL) {
        request->done = 1;
        Py_DECREF(request);
        if (commlens_hand_over_error(state->recording_failed, self->recorder) < 0)
            return NULL;
        return PyObject_CallFunctionObjArgs(self->app, environ, start_response, NULL);
    }
    PyObject *app_args[] = {NULL, environ, (PyObject *)request};
    PyObject *body = PyObject_Vectorcall(self->app, app_args + 1,
                                         2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (body == NULL) {
        /* The application raised: a 500, and its exception goes on as it is. */
        PyObject *exc = PyErr_GetRaisedException();
        int reset = PyContextVar_Reset(state->current, token);
        Py_DECREF(token);
        if (reset < 0 && commlens_hand_over_error(state->recording_failed, self->recorder) < 0) {
            request->done = 1;
            Py_DECREF(request);
            commlens_raise_over(exc);
            return NULL;
        }
        PyObject *name = PyObject_GetAttrString((PyObject *)Py_TYPE(exc), "__name__");
        PyObject *label = name == NULL ? NULL : PyObject_CallOneArg(state->error_class, name);
        Py_XDECREF(name);
        if (label == NULL) {
            PyErr_Clear();
            label = Py_NewRef(state->str_500);
        }
        Py_XSETREF(request->error, label);
        int finished = request_finish(request, NULL);
        Py_DECREF(request);
        if (finished < 0)
            commlens_raise_over(exc);
        else
            PyErr_SetRaisedException(exc);
        return NULL;
    }
    int reset = PyContextVar_Reset(state->current, token);
    Py_DECREF(token);
    if (reset < 0 && commlens_hand_over_error(state->recording_failed, self->recorder) < 0) {
        request->done = 1;
        Py_DECREF(request);
        Py_DECREF(body);
        return NULL;
    }
    PyObject *wrapped;
    if (PyList_CheckExact(body))
        wrapped = list_body_new(state, body, request);
    else
        wrapped = PyObject_CallFunctionObjArgs(state->wrap_iterable, body, request, NULL);
    Py_DECREF(request);
    Py_DECREF(body);
    return wrapped;
}

static int
middleware_init(Middleware *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"app", "service", "recorder", "routes", NULL};
    PyObject *app, *service, *recorder, *routes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUOO:Middleware", keywords,
                                     &app, &service, &recorder, &routes))
        return -1;
    /* Middleware is subclassed (wsgi.CommlensMiddleware): its module is
     * found along the MRO. */
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &module_def);
    if (module == NULL)
        return -1;
    WsgiState *state = PyModule_GetState(module);
    if (state->current == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Middleware: bind() first (wsgi.py does)");
        return -1;
    }
    self->state = state;
    PyObject *memo = PyObject_GetAttrString(routes, "remembered");
    if (memo == NULL)
        return -1;
    if (!PyDict_CheckExact(memo)) {
        Py_DECREF(memo);
        PyErr_SetString(PyExc_TypeError, "routes.remembered is not a dict");
        return -1;
    }
    Py_XSETREF(self->routes_memo, memo);
    if (commlens_recording_init(&self->recording, recorder) < 0)
        return -1;
    Py_XSETREF(self->app, Py_NewRef(app));
    Py_XSETREF(self->service, Py_NewRef(service));
    Py_XSETREF(self->recorder, Py_NewRef(recorder));
    Py_XSETREF(self->routes, Py_NewRef(routes));
    return 0;
}

static int
middleware_traverse(Middleware *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->service);
    Py_VISIT(self->recorder);
    Py_VISIT(self->routes);
    Py_VISIT(self->routes_memo);
    COMMLENS_RECORDING_VISIT(self->recording);
    Py_VISIT(self->dict);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
middleware_clear(Middleware *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->service);
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->routes);
    Py_CLEAR(self->routes_memo);
    COMMLENS_RECORDING_CLEAR(self->recording);
    Py_CLEAR(self->dict);
    return 0;
}

static void
middleware_dealloc(Middleware *self)
{
    /* A Python subclass's instance comes here from subtype_dealloc, which
     * leaves the subclass to this: the base is a heap type. */
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    middleware_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyGetSetDef middleware_getset[] = {
    COMMLENS_READONLY_FIELD("app", Middleware, app),
    COMMLENS_READONLY_FIELD("service", Middleware, service),
    COMMLENS_READONLY_FIELD("recorder", Middleware, recorder),
    {NULL},
};

static PyMemberDef middleware_members[] = {
    /* tp_dictoffset, as a heap type declares it */
    {"__dictoffset__", Py_T_PYSSIZET, offsetof(Middleware, dict), Py_READONLY, NULL},
    {NULL},
};

static PyType_Slot middleware_slots[] = {
    {Py_tp_doc, (void *)"Middleware(app, service, recorder, routes): the per-request path "
                        "of wsgi.CommlensMiddleware."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, middleware_init},
    {Py_tp_dealloc, middleware_dealloc},
    {Py_tp_traverse, middleware_traverse},
    {Py_tp_clear, middleware_clear},
    {Py_tp_call, middleware_call},
    {Py_tp_getset, middleware_getset},
    {Py_tp_members, middleware_members},
    {0, NULL},
};

static PyType_Spec middleware_spec = {
    .name = "commlens.middleware._wsgi_request.Middleware",
    .basicsize = sizeof(Middleware),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC
        | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = middleware_slots,
};

/* -- module --------------------------------------------------------------- */

static PyObject *
bind(PyObject *module, PyObject *args, PyObject *kwargs)
{
    WsgiState *state = PyModule_GetState(module);
    static char *keywords[] = {
        "trace_context", "child_of_incoming", "baggage_caller", "user_agent_memo",
        "caller_from_user_agent", "status_codes", "status_code", "http_methods",
        "other_method", "current", "hop_metric", "error_class", "record_hop",
        "recording_failed", "wrap_iterable", NULL};
    PyObject *v[15];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$O!OOO!OO!OO!UO!UOOOO:bind", keywords,
                                     &PyType_Type, &v[0], &v[1], &v[2], &PyDict_Type, &v[3],
                                     &v[4], &PyDict_Type, &v[5], &v[6], &PyFrozenSet_Type,
                                     &v[7], &v[8], &PyContextVar_Type, &v[9], &v[10], &v[11],
                                     &v[12], &v[13], &v[14]))
        return NULL;
    PyObject **slots[] = {
        (PyObject **)&state->trace_context, &state->child_of_incoming, &state->baggage_caller,
        &state->user_agent_memo, &state->caller_from_user_agent, &state->status_codes,
        &state->status_code, &state->http_methods, &state->other_method, &state->current,
        &state->hop_metric, &state->error_class, &state->record_hop, &state->recording_failed,
        &state->wrap_iterable};
    if (commlens_check_trace_context_type(v[0]) < 0)
        return NULL;
    for (int i = 0; i < 15; i++)
        Py_XSETREF(*slots[i], Py_NewRef(v[i]));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))bind, METH_VARARGS | METH_KEYWORDS,
     "Give the per-request path the Python it calls back (wsgi.py, once)."},
    {NULL},
};

static int
wsgi_exec(PyObject *module)
{
    WsgiState *state = PyModule_GetState(module);
#define INTERN(name, text) \
    if ((state->str_##name = PyUnicode_InternFromString(text)) == NULL) return -1;
    WSGI_STRINGS(INTERN)
#undef INTERN
    struct { PyType_Spec *spec; PyTypeObject **type; PyObject *base; } types[] = {
        {&middleware_spec, &state->middleware_type, NULL},
        {&request_spec, &state->request_type, NULL},
        {&list_body_spec, &state->list_body_type, (PyObject *)&PyList_Type},
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        *types[i].type = (PyTypeObject *)PyType_FromModuleAndSpec(module, types[i].spec,
                                                                  types[i].base);
        if (*types[i].type == NULL || PyModule_AddType(module, *types[i].type) < 0)
            return -1;
    }
    return 0;
}

static int
wsgi_traverse_module(PyObject *module, visitproc visit, void *arg)
{
    WsgiState *state = PyModule_GetState(module);
    Py_VISIT(state->middleware_type);
    Py_VISIT(state->request_type);
    Py_VISIT(state->list_body_type);
#define VISIT(name) Py_VISIT(state->name);
    WSGI_BOUND(VISIT)
#undef VISIT
    return 0;
}

/* The types and what bind() gave, which may refer to the module, go when
 * it is collected; the strings, which refer to nothing, when it is freed. */
static int
wsgi_clear_module(PyObject *module)
{
    WsgiState *state = PyModule_GetState(module);
    Py_CLEAR(state->middleware_type);
    Py_CLEAR(state->request_type);
    Py_CLEAR(state->list_body_type);
#define CLEAR(name) Py_CLEAR(state->name);
    WSGI_BOUND(CLEAR)
#undef CLEAR
    return 0;
}

static void
wsgi_free_module(void *module)
{
    WsgiState *state = PyModule_GetState((PyObject *)module);
    wsgi_clear_module((PyObject *)module);
#define CLEAR(name, text) Py_CLEAR(state->str_##name);
    WSGI_STRINGS(CLEAR)
#undef CLEAR
}

static PyModuleDef_Slot wsgi_slots[] = {
    {Py_mod_exec, wsgi_exec},
    COMMLENS_SLOT_INTERPRETERS
    COMMLENS_SLOT_GIL
    {0, NULL},
};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_wsgi_request",
    .m_doc = "The WSGI middleware's per-request path, compiled (see middleware/wsgi.py).",
    .m_size = sizeof(WsgiState),
    .m_methods = module_methods,
    .m_slots = wsgi_slots,
    .m_traverse = wsgi_traverse_module,
    .m_clear = wsgi_clear_module,
    .m_free = wsgi_free_module,
};

PyMODINIT_FUNC
PyInit__wsgi_request(void)
{
    return PyModuleDef_Init(&module_def);
}
