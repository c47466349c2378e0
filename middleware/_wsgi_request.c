/* The WSGI middleware's per-request path, compiled.
 *
 * middleware/wsgi.py is the middleware; this file is only what runs for
 * every request, and wsgi.py says what it does and why. Whatever is rare
 * (a traceparent to parse, an unseen User-Agent, route or status line, a
 * hop to ship, an error) is a call back into wsgi.py's Python, given to
 * bind() once at import.
 *
 * Why C: on a minimal app under a fast server the same path in Python cost
 * about 8 % of the request (README, "Benchmark"), most of it in making and
 * calling Python objects: the request, its start_response, the list body's
 * close() and finaliser. Here those are C structs and C calls.
 *
 * Every function called with the GIL held, as CPython calls them; nothing
 * here releases it, so a request's fields change under one thread at a time.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "../tracer/_speedups.h"

/* -- what wsgi.py binds --------------------------------------------------- */

static struct {
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
} bound;

static PyObject *str_HTTP_TRACEPARENT, *str_HTTP_BAGGAGE, *str_HTTP_USER_AGENT,
    *str_REQUEST_METHOD, *str_PATH_INFO, *str_dropped,
    *str_bad_context, *str_500, *str_000;

/* -- the middleware's base ------------------------------------------------ */

typedef struct {
    PyObject_HEAD
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

static PyTypeObject MiddlewareType, RequestType, ListBodyType;

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
    PyObject_GC_UnTrack(self);
    request_clear_fields(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
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
status_code(PyObject *status)
{
    if (status != NULL && PyUnicode_CheckExact(status)) {
        PyObject *code = PyDict_GetItemWithError(bound.status_codes, status);
        if (code != NULL)
            return Py_NewRef(code);
        if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_CallOneArg(bound.status_code, status ? status : Py_None);
}

/* 1 if the status code label is a failure's, 0 if not; -1 and an error if
 * it is not a str (status_codes and status_code are Python's). */
static int
is_failed_code(PyObject *code)
{
    if (!PyUnicode_Check(code)) {
        PyErr_SetString(PyExc_TypeError, "a status code label is a str");
        return -1;
    }
    if (PyUnicode_GET_LENGTH(code) < 1)
        return 1;
    Py_UCS4 first = PyUnicode_READ_CHAR(code, 0);
    return first == '4' || first == '5'
        || (first == '0' && PyUnicode_Compare(code, str_000) == 0);
}

static int
request_record(Request *self, PyObject *body)
{
    double duration = commlens_monotonic() - self->start;
    Middleware *mw = self->middleware;
    PyObject *code = self->error != NULL && self->error != Py_None
        ? Py_NewRef(str_500) : status_code(self->status);
    if (code == NULL)
        return -1;
    /* Checked before it becomes a label: not a str, nothing is recorded. */
    int failed = is_failed_code(code);
    PyObject *duration_obj = failed < 0 ? NULL : PyFloat_FromDouble(duration);
    if (duration_obj == NULL) {
        Py_DECREF(code);
        return -1;
    }
    int result = commlens_record(
        mw->recording.observe, bound.hop_metric,
        PyTuple_Pack(5, mw->service, self->caller, self->method, self->route, code),
        duration_obj);
    CommlensTraceContext *ctx = (CommlensTraceContext *)self->ctx;
    int keep = result < 0 ? -1 : commlens_keeps_hop(
        &mw->recording, ctx->trace_id, duration_obj, failed ? Py_True : ctx->child_failed);
    if (keep > 0) {
        PyObject *done = PyObject_CallFunctionObjArgs(
            bound.record_hop, (PyObject *)self, code, failed ? Py_True : Py_False,
            duration_obj, body ? body : Py_None, NULL);
        Py_XDECREF(done);
        keep = done == NULL ? -1 : 0;
    }
    Py_DECREF(duration_obj);
    Py_DECREF(code);
    return keep < 0 ? -1 : 0;
}

/* Record the request, once, however it ended; never raises. */
static void
request_finish(Request *self, PyObject *body)
{
    if (self->done)
        return;
    self->done = 1;
    if (request_record(self, body) < 0)
        commlens_hand_over_error(bound.recording_failed, self->middleware->recorder);
}

static PyObject *
request_finish_method(Request *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "finish() takes at most one argument");
        return NULL;
    }
    request_finish(self, nargs ? args[0] : NULL);
    Py_RETURN_NONE;
}

static PyMethodDef request_methods[] = {
    {"finish", (PyCFunction)(void (*)(void))request_finish_method, METH_FASTCALL,
     "Record the request, once, however it ended; the argument: a list body."},
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

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "commlens.middleware._wsgi_request.Request",
    .tp_doc = "One request in flight; also the start_response the application gets.",
    .tp_basicsize = sizeof(Request),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)request_dealloc,
    .tp_traverse = (traverseproc)request_traverse,
    .tp_clear = (inquiry)request_clear,
    .tp_call = (ternaryfunc)request_call,
    .tp_methods = request_methods,
    .tp_getset = request_getset,
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
request_caller(PyObject *environ, CommlensTraceContext *ctx, int has_traceparent)
{
    if (has_traceparent && ctx->parent_id != Py_None) {
        PyObject *baggage = environ_get(environ, str_HTTP_BAGGAGE);
        if (baggage == NULL)
            return NULL;
        PyObject *caller = baggage == Py_None ? Py_NewRef(Py_None)
            : PyObject_CallFunctionObjArgs(bound.baggage_caller, baggage, ctx->parent_id,
                                           NULL);
        Py_DECREF(baggage);
        if (caller == NULL || caller != Py_None)
            return caller;
        Py_DECREF(caller);
    }
    PyObject *user_agent = environ_get(environ, str_HTTP_USER_AGENT);
    if (user_agent == NULL)
        return NULL;
    PyObject *caller = Py_XNewRef(PyDict_GetItemWithError(bound.user_agent_memo, user_agent));
    if (caller == NULL && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError))  /* an unhashable value */
            PyErr_Clear();
    }
    if (caller == NULL && !PyErr_Occurred())
        caller = PyObject_CallOneArg(bound.caller_from_user_agent, user_agent);
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
    Request *self = PyObject_GC_New(Request, &RequestType);
    if (self == NULL)
        return NULL;
    self->middleware = (Middleware *)Py_NewRef(mw);
    self->ctx = self->caller = self->method = self->route = NULL;
    self->status = self->headers = self->error = NULL;
    self->environ = Py_NewRef(environ);
    self->start_response = Py_NewRef(start_response);
    self->done = 0;
    PyObject_GC_Track(self);

    PyObject *traceparent = environ_get(environ, str_HTTP_TRACEPARENT);
    PyObject *method = NULL, *path = NULL;
    if (traceparent == NULL)
        goto fail;
    if (traceparent == Py_None) {
        self->ctx = commlens_trace_context_new(bound.trace_context);
        if (self->ctx == NULL)
            goto fail;
    } else {
        PyObject *parsed = PyObject_CallOneArg(bound.child_of_incoming, traceparent);
        if (parsed == NULL)
            goto fail;
        if (!PyTuple_Check(parsed) || PyTuple_GET_SIZE(parsed) != 2) {
            Py_DECREF(parsed);
            PyErr_SetString(PyExc_TypeError, "child_of_incoming: not a pair");
            goto fail;
        }
        self->ctx = Py_NewRef(PyTuple_GET_ITEM(parsed, 0));
        if (Py_TYPE(self->ctx) != bound.trace_context) {
            Py_DECREF(parsed);
            PyErr_SetString(PyExc_TypeError, "child_of_incoming: not a TraceContext");
            goto fail;
        }
        int valid = PyObject_IsTrue(PyTuple_GET_ITEM(parsed, 1));
        Py_DECREF(parsed);
        if (valid < 0)
            goto fail;
        if (!valid) {
            PyObject *r = PyObject_CallMethodOneArg(mw->recorder, str_dropped,
                                                    str_bad_context);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
    }
    Py_SETREF(((CommlensTraceContext *)self->ctx)->service, Py_NewRef(mw->service));
    self->caller = request_caller(environ, (CommlensTraceContext *)self->ctx,
                                  traceparent != Py_None);
    if (self->caller == NULL)
        goto fail;

    method = environ_get(environ, str_REQUEST_METHOD);
    if (method == NULL)
        goto fail;
    int known = PySet_Contains(bound.http_methods, method);
    if (known < 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            goto fail;
        PyErr_Clear();
        known = 0;
    }
    self->method = Py_NewRef(known ? method : bound.other_method);

    path = environ_get(environ, str_PATH_INFO);
    if (path == NULL)
        goto fail;
    /* The route is of SCRIPT_NAME + PATH_INFO (_wsgi_request_py._route_path
     * says why): a non-empty exact str SCRIPT_NAME goes before an absent or
     * exact str PATH_INFO. The key is interned here, once, rather than in the
     * module's init. */
    static PyObject *str_SCRIPT_NAME = NULL;
    if (str_SCRIPT_NAME == NULL
            && (str_SCRIPT_NAME = PyUnicode_InternFromString("SCRIPT_NAME")) == NULL)
        goto fail;
    PyObject *script = environ_get(environ, str_SCRIPT_NAME);
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
    if (self->request != NULL)
        request_finish(self->request, (PyObject *)self);
    Py_RETURN_NONE;
}

static void
list_body_finalize(ListBody *self)
{
    /* A server that never called close() (werkzeug's development server
     * when the client hung up): the request still ends, once. */
    if (self->request != NULL && !self->request->done) {
        PyObject *exc = PyErr_GetRaisedException();
        request_finish(self->request, (PyObject *)self);
        PyErr_SetRaisedException(exc);
    }
}

static void
list_body_dealloc(ListBody *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return;  /* resurrected */
    Py_CLEAR(self->request);
    PyList_Type.tp_dealloc((PyObject *)self);
}

static int
list_body_traverse(ListBody *self, visitproc visit, void *arg)
{
    Py_VISIT(self->request);
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

static PyTypeObject ListBodyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "commlens.middleware._wsgi_request.ListBody",
    .tp_doc = "A list body, still a list to the server, with the close() that ends "
              "the request.",
    .tp_basicsize = sizeof(ListBody),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_LIST_SUBCLASS,
    .tp_dealloc = (destructor)list_body_dealloc,
    .tp_finalize = (destructor)list_body_finalize,
    .tp_traverse = (traverseproc)list_body_traverse,
    .tp_clear = (inquiry)list_body_clear,
    .tp_methods = list_body_methods,
    .tp_getset = list_body_getset,
};

static PyObject *
list_body_new(PyObject *items, Request *request)
{
    ListBody *self = (ListBody *)PyType_GenericAlloc(&ListBodyType, 0);
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
    Request *request = request_new(self, environ, start_response);
    if (request == NULL) {
        commlens_hand_over_error(bound.recording_failed, self->recorder);
        return PyObject_CallFunctionObjArgs(self->app, environ, start_response, NULL);
    }
    PyObject *token = PyContextVar_Set(bound.current, request->ctx);
    if (token == NULL) {
        request->done = 1;
        Py_DECREF(request);
        commlens_hand_over_error(bound.recording_failed, self->recorder);
        return PyObject_CallFunctionObjArgs(self->app, environ, start_response, NULL);
    }
    PyObject *app_args[] = {NULL, environ, (PyObject *)request};
    PyObject *body = PyObject_Vectorcall(self->app, app_args + 1,
                                         2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (body == NULL) {
        /* The application raised: a 500, and its exception goes on as it is. */
        PyObject *exc = PyErr_GetRaisedException();
        if (PyContextVar_Reset(bound.current, token) < 0)
            commlens_hand_over_error(bound.recording_failed, self->recorder);
        Py_DECREF(token);
        PyObject *name = PyObject_GetAttrString((PyObject *)Py_TYPE(exc), "__name__");
        PyObject *label = name == NULL ? NULL : PyObject_CallOneArg(bound.error_class, name);
        Py_XDECREF(name);
        if (label == NULL) {
            PyErr_Clear();
            label = Py_NewRef(str_500);
        }
        Py_XSETREF(request->error, label);
        request_finish(request, NULL);
        Py_DECREF(request);
        PyErr_SetRaisedException(exc);
        return NULL;
    }
    if (PyContextVar_Reset(bound.current, token) < 0)
        commlens_hand_over_error(bound.recording_failed, self->recorder);
    Py_DECREF(token);
    PyObject *wrapped;
    if (PyList_CheckExact(body))
        wrapped = list_body_new(body, request);
    else
        wrapped = PyObject_CallFunctionObjArgs(bound.wrap_iterable, body, request, NULL);
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
     * releases the subclass itself. */
    PyObject_GC_UnTrack(self);
    middleware_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef middleware_getset[] = {
    COMMLENS_READONLY_FIELD("app", Middleware, app),
    COMMLENS_READONLY_FIELD("service", Middleware, service),
    COMMLENS_READONLY_FIELD("recorder", Middleware, recorder),
    {NULL},
};

static PyTypeObject MiddlewareType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "commlens.middleware._wsgi_request.Middleware",
    .tp_doc = "Middleware(app, service, recorder, routes): the per-request path of "
              "wsgi.CommlensMiddleware.",
    .tp_basicsize = sizeof(Middleware),
    .tp_dictoffset = offsetof(Middleware, dict),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)middleware_init,
    .tp_dealloc = (destructor)middleware_dealloc,
    .tp_traverse = (traverseproc)middleware_traverse,
    .tp_clear = (inquiry)middleware_clear,
    .tp_call = (ternaryfunc)middleware_call,
    .tp_getset = middleware_getset,
};

/* -- module --------------------------------------------------------------- */

static PyObject *
bind(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
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
        (PyObject **)&bound.trace_context, &bound.child_of_incoming, &bound.baggage_caller,
        &bound.user_agent_memo, &bound.caller_from_user_agent, &bound.status_codes,
        &bound.status_code, &bound.http_methods, &bound.other_method, &bound.current,
        &bound.hop_metric, &bound.error_class, &bound.record_hop, &bound.recording_failed,
        &bound.wrap_iterable};
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

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_wsgi_request",
    .m_doc = "The WSGI middleware's per-request path, compiled (see middleware/wsgi.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC
PyInit__wsgi_request(void)
{
    INTERN(str_HTTP_TRACEPARENT, "HTTP_TRACEPARENT");
    INTERN(str_HTTP_BAGGAGE, "HTTP_BAGGAGE");
    INTERN(str_HTTP_USER_AGENT, "HTTP_USER_AGENT");
    INTERN(str_REQUEST_METHOD, "REQUEST_METHOD");
    INTERN(str_PATH_INFO, "PATH_INFO");
    INTERN(str_dropped, "dropped");
    INTERN(str_bad_context, "bad_context");
    INTERN(str_500, "500");
    INTERN(str_000, "000");

    ListBodyType.tp_base = &PyList_Type;
    if (PyType_Ready(&MiddlewareType) < 0 || PyType_Ready(&RequestType) < 0
            || PyType_Ready(&ListBodyType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Middleware", (PyObject *)&MiddlewareType) < 0
            || PyModule_AddObjectRef(module, "Request", (PyObject *)&RequestType) < 0
            || PyModule_AddObjectRef(module, "ListBody", (PyObject *)&ListBodyType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
