/* The RPC client's per-send path, compiled.
 *
 * middleware/rpc_driver.py is the driver wrapper; this file is only what
 * runs around every call, cast and fanout a service sends (CommlensDriver.
 * send), and rpc_driver.py says what it records and why. What is rare (a
 * context that is not a dict, an unseen method name, a send that failed, a
 * hop to ship) is a call back into rpc_driver.py's Python, given to the
 * Sender when the driver is made.
 *
 * Why C: between the driver's socket reads, the same path in Python cost a
 * service about 20 µs per cast, ten times its cost in a loop, most of it in
 * touching Python objects that the driver's own work had pushed out of the
 * CPU's caches (docs/benchmarks.md).
 *
 * Every function called with the GIL held, as CPython calls them; nothing
 * here releases it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "../tracer/_speedups.h"

/* -- the module's state --------------------------------------------------- */

/* One per interpreter that imports commlens (multi-phase init, PEP 489): its
 * types and the strings it reads and writes, interned in that interpreter. */
#define SEND_STRINGS(X) \
    X(call, "call") X(cast, "cast") X(fanout, "fanout") X(ok, "ok") \
    X(fanout_attr, "fanout") X(topic, "topic") X(method, "method") X(get, "get") \
    X(call_started, "call_started") X(call_finished, "call_finished") \
    X(bad_context, "bad_context") X(dropped, "dropped")

typedef struct {
    PyTypeObject *sender_type;
    PyTypeObject *send_type;
#define FIELD(name, text) PyObject *str_##name;
    SEND_STRINGS(FIELD)
#undef FIELD
} SendState;

/* -- Sender: one per driver ----------------------------------------------- */

typedef struct {
    PyObject_HEAD
    /* Its module's, read on every send. Borrowed: the Sender holds its type,
     * which holds the module. */
    SendState *state;
    PyObject *service;
    PyObject *recorder;
    CommlensRecording recording;
    PyObject *open_calls;      /* set of the tokens of calls waiting for a reply */
    PyObject *sent_metric;     /* metrics.RPC_SENT.name */
    PyObject *reply_wait_metric;  /* metrics.RPC_REPLY_WAIT.name */
    PyObject *budget_metric;   /* metrics.RPC_TIMEOUT_BUDGET.name */
    PyObject *over_half_metric;  /* metrics.RPC_OVER_HALF_TIMEOUT.name */
    PyObject *method_seen;     /* labels.method.seen */
    PyObject *method_label;    /* labels.method */
    PyObject *context_copy;    /* rpc_driver._context_copy */
    PyObject *stamp;           /* context.stamp_outgoing */
    PyObject *failed;          /* (send, exception, duration): the error path */
    PyObject *add_hop;         /* (send, outcome, error, duration) */
    PyObject *recording_failed;  /* (exception) */
    PyObject *inner_send;      /* the inner driver's send */
    PyTypeObject *trace_context;  /* _speedups.TraceContext: what stamp returns */
} Sender;

typedef struct {
    PyObject_HEAD
    Sender *sender;
    PyObject *ctxt;      /* the message context sent: a copy, stamped */
    PyObject *ctx;       /* the hop's TraceContext */
    PyObject *kind;      /* call, cast or fanout */
    PyObject *topic;
    PyObject *method;
    PyObject *target;    /* the oslo.messaging Target: its server is read for hops only */
    PyObject *token;     /* a call's waiting-reply token, or None */
    double start;
    double timeout;      /* a call's timeout in seconds, or 0: none (budget_timeout) */
    char done;
} Send;

/* metrics.BUDGET_OVER: a call is close to its timeout past this fraction. */
#define BUDGET_OVER 0.5

static PyObject *send_end(Send *self, PyObject *exc);

static int
sender_init(Sender *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "service", "recorder", "sent_metric", "reply_wait_metric", "budget_metric",
        "over_half_metric", "method_label", "context_copy", "stamp", "failed", "add_hop",
        "recording_failed", "inner_send", NULL};
    PyObject *service, *recorder, *sent, *reply_wait, *budget, *over_half, *method_label,
        *context_copy, *stamp, *failed, *add_hop, *recording_failed, *inner_send;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$UOUUUUOOOOOOO:Sender", keywords,
                                     &service, &recorder, &sent, &reply_wait, &budget,
                                     &over_half, &method_label, &context_copy, &stamp, &failed,
                                     &add_hop, &recording_failed, &inner_send))
        return -1;
    SendState *state = PyType_GetModuleState(Py_TYPE(self));
    if (state == NULL)
        return -1;
    self->state = state;
    PyTypeObject *trace_context = commlens_trace_context_base();
    if (trace_context == NULL)
        return -1;
    Py_XSETREF(self->trace_context, trace_context);
    if (commlens_recording_init(&self->recording, recorder) < 0)
        return -1;
    PyObject *seen = commlens_method_seen(method_label);
    PyObject *open_calls = seen ? PySet_New(NULL) : NULL;
    if (open_calls == NULL) {
        Py_XDECREF(seen);
        return -1;
    }
    Py_XSETREF(self->method_seen, seen);
    Py_XSETREF(self->open_calls, open_calls);
    Py_XSETREF(self->service, Py_NewRef(service));
    Py_XSETREF(self->recorder, Py_NewRef(recorder));
    Py_XSETREF(self->sent_metric, Py_NewRef(sent));
    Py_XSETREF(self->reply_wait_metric, Py_NewRef(reply_wait));
    Py_XSETREF(self->budget_metric, Py_NewRef(budget));
    Py_XSETREF(self->over_half_metric, Py_NewRef(over_half));
    Py_XSETREF(self->method_label, Py_NewRef(method_label));
    Py_XSETREF(self->context_copy, Py_NewRef(context_copy));
    Py_XSETREF(self->stamp, Py_NewRef(stamp));
    Py_XSETREF(self->failed, Py_NewRef(failed));
    Py_XSETREF(self->add_hop, Py_NewRef(add_hop));
    Py_XSETREF(self->recording_failed, Py_NewRef(recording_failed));
    Py_XSETREF(self->inner_send, Py_NewRef(inner_send));
    return 0;
}

static int
sender_traverse(Sender *self, visitproc visit, void *arg)
{
    Py_VISIT(self->service);
    Py_VISIT(self->recorder);
    COMMLENS_RECORDING_VISIT(self->recording);
    Py_VISIT(self->open_calls);
    Py_VISIT(self->sent_metric);
    Py_VISIT(self->reply_wait_metric);
    Py_VISIT(self->budget_metric);
    Py_VISIT(self->over_half_metric);
    Py_VISIT(self->method_seen);
    Py_VISIT(self->method_label);
    Py_VISIT(self->context_copy);
    Py_VISIT(self->stamp);
    Py_VISIT(self->failed);
    Py_VISIT(self->add_hop);
    Py_VISIT(self->recording_failed);
    Py_VISIT(self->inner_send);
    Py_VISIT(self->trace_context);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
sender_clear(Sender *self)
{
    Py_CLEAR(self->service);
    Py_CLEAR(self->recorder);
    COMMLENS_RECORDING_CLEAR(self->recording);
    Py_CLEAR(self->open_calls);
    Py_CLEAR(self->sent_metric);
    Py_CLEAR(self->reply_wait_metric);
    Py_CLEAR(self->budget_metric);
    Py_CLEAR(self->over_half_metric);
    Py_CLEAR(self->method_seen);
    Py_CLEAR(self->method_label);
    Py_CLEAR(self->context_copy);
    Py_CLEAR(self->stamp);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->add_hop);
    Py_CLEAR(self->recording_failed);
    Py_CLEAR(self->inner_send);
    Py_CLEAR(self->trace_context);
    return 0;
}

static void
sender_dealloc(Sender *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    sender_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* The method label of a message (message.get("method")). */
static PyObject *
method_label(Sender *self, PyObject *message)
{
    SendState *state = self->state;
    PyObject *raw;
    if (PyDict_CheckExact(message)) {
        raw = PyDict_GetItemWithError(message, state->str_method);
        if (raw == NULL && PyErr_Occurred())
            return NULL;
        raw = raw ? Py_NewRef(raw) : Py_NewRef(Py_None);
    } else {
        raw = PyObject_CallMethodOneArg(message, state->str_get, state->str_method);
        if (raw == NULL)
            return NULL;
    }
    PyObject *label = commlens_method_label(self->method_seen, self->method_label, raw);
    Py_DECREF(raw);
    return label;
}

static PyObject *
call_method(PyObject *callable, PyObject *arg)
{
    PyObject *args[] = {NULL, arg};
    return PyObject_Vectorcall(callable, args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* A call's timeout as the seconds its budget is measured against: a
 * positive, finite int or float (exactly), else 0, no budget. Never raises. */
static double
budget_timeout(PyObject *timeout)
{
    double seconds;
    if (PyFloat_CheckExact(timeout)) {
        seconds = PyFloat_AS_DOUBLE(timeout);
    } else if (PyLong_CheckExact(timeout)) {
        seconds = PyLong_AsDouble(timeout);
        if (seconds == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();  /* too large for a double: no budget, as in Python */
            return 0.0;
        }
    } else {
        return 0.0;
    }
    return (seconds > 0.0 && seconds < Py_HUGE_VAL) ? seconds : 0.0;
}

/* begin(target, ctxt, message, wait_for_reply, timeout=None) -> Send, or
 * None when the context cannot carry ours (counted as dropped
 * "bad_context"): the send then goes on unrecorded. Raises only on
 * commlens's own errors, which the driver counts and sends on without
 * recording. */
static PyObject *
sender_begin(Sender *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "begin(target, ctxt, message, wait_for_reply, timeout=None)");
        return NULL;
    }
    PyObject *target = args[0], *ctxt = args[1], *message = args[2];
    if (self->recorder == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Sender not initialised");
        return NULL;
    }
    SendState *state = self->state;
    PyObject *out = PyDict_CheckExact(ctxt) ? PyDict_Copy(ctxt)
                                            : call_method(self->context_copy, ctxt);
    if (out == NULL)
        return NULL;
    if (!PyDict_Check(out)) {
        Py_DECREF(out);
        PyObject *result = PyObject_CallMethodOneArg(self->recorder, state->str_dropped,
                                                     state->str_bad_context);
        if (result == NULL)
            return NULL;
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
    Send *call = PyObject_GC_New(Send, state->send_type);
    if (call == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    call->sender = (Sender *)Py_NewRef(self);
    call->ctxt = out;
    call->ctx = call->kind = call->topic = call->method = NULL;
    call->target = Py_NewRef(target);
    call->token = Py_NewRef(Py_None);
    call->start = 0.0;
    call->timeout = 0.0;
    call->done = 0;
    PyObject_GC_Track(call);

    int wait = PyObject_IsTrue(args[3]);
    if (wait < 0)
        goto fail;
    if (wait) {
        call->kind = Py_NewRef(state->str_call);
        call->timeout = nargs == 5 ? budget_timeout(args[4]) : 0.0;
    } else {
        PyObject *fanout = PyObject_GetAttr(target, state->str_fanout_attr);
        int is_fanout = fanout ? PyObject_IsTrue(fanout) : -1;
        Py_XDECREF(fanout);
        if (is_fanout < 0)
            goto fail;
        call->kind = Py_NewRef(is_fanout ? state->str_fanout : state->str_cast);
    }
    if ((call->method = method_label(self, message)) == NULL)
        goto fail;
    PyObject *stamp_args[] = {NULL, out, self->service, call->kind};
    call->ctx = PyObject_Vectorcall(self->stamp, stamp_args + 1,
                                    3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (call->ctx == NULL)
        goto fail;
    /* end() reads the hop's fields as C: whatever ``stamp`` returned is
     * checked to have them. */
    if (!PyObject_TypeCheck(call->ctx, self->trace_context)) {
        PyErr_SetString(PyExc_TypeError, "stamp did not return a TraceContext");
        goto fail;
    }
    if ((call->topic = PyObject_GetAttr(target, state->str_topic)) == NULL)
        goto fail;

    if (commlens_record(self->recording.inc, self->sent_metric,
                        PyTuple_Pack(4, self->service, call->topic, call->method, call->kind),
                        NULL) < 0)
        goto fail;
    if (wait) {
        PyObject *labels = PyTuple_Pack(3, self->service, call->topic, call->method);
        PyObject *token = labels == NULL ? NULL : PyObject_CallMethodOneArg(
            self->recorder, state->str_call_started, labels);
        Py_XDECREF(labels);
        if (token == NULL)
            goto fail;
        Py_SETREF(call->token, token);
        if (PySet_Add(self->open_calls, token) < 0)
            goto fail;
    }
    call->start = commlens_monotonic();
    return (PyObject *)call;
fail:
    /* A call already counted as waiting is finished, so the gauge does not
     * stay up for a send that goes out unrecorded. */
    if (call->token != Py_None) {
        PyObject *exc = PyErr_GetRaisedException();
        PyObject *result = PyObject_CallMethodOneArg(self->recorder,
                                                     state->str_call_finished, call->token);
        Py_XDECREF(result);
        if (PySet_Discard(self->open_calls, call->token) < 0 || result == NULL)
            PyErr_Clear();
        PyErr_SetRaisedException(exc);
    }
    call->done = 1;
    Py_DECREF(call);
    return NULL;
}

/* BaseDriver.send's parameters, as many as a send may be given. */
#define SEND_MAX_ARGS 8

/* The argument named ``name`` of a send: positional ``index``, or a keyword. */
static PyObject *
send_argument(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              Py_ssize_t index, const char *name, Py_ssize_t *at)
{
    if (index < nargs) {
        *at = index;
        return args[index];
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, i), name) == 0) {
            *at = nargs + i;
            return args[nargs + i];
        }
    }
    return NULL;
}

/* send(target, ctxt, message, wait_for_reply=None, timeout=None, ...) ->
 * what the inner driver's send returns: CommlensDriver.send is this method
 * itself (middleware/_rpc_send_py.py's Sender.send is its reference).
 *
 * The inner driver is called from here, in C, with the arguments as they
 * came, the context replaced by the stamped copy. A C function adds no
 * frame to a traceback, so an exception out of the inner driver (a
 * MessagingTimeout, a RemoteError, a transport error) reaches the service
 * exactly as it was raised, with no commlens frame in its traceback. */
static PyObject *
sender_send(Sender *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t total = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    if (self->inner_send == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Sender not initialised");
        return NULL;
    }
    Py_ssize_t ctxt_at = -1, unused;
    PyObject *target = send_argument(args, nargs, kwnames, 0, "target", &unused);
    PyObject *ctxt = send_argument(args, nargs, kwnames, 1, "ctxt", &ctxt_at);
    PyObject *message = send_argument(args, nargs, kwnames, 2, "message", &unused);
    PyObject *wait = send_argument(args, nargs, kwnames, 3, "wait_for_reply", &unused);
    PyObject *timeout = send_argument(args, nargs, kwnames, 4, "timeout", &unused);
    if (target == NULL || ctxt == NULL || message == NULL || total > SEND_MAX_ARGS)
        /* Not a send we can read: the inner driver says what is wrong. */
        return PyObject_Vectorcall(self->inner_send, args, nargs, kwnames);
    PyObject *begin_args[] = {target, ctxt, message, wait ? wait : Py_None,
                              timeout ? timeout : Py_None};
    PyObject *call = sender_begin(self, begin_args, 5);
    if (call == NULL) {
        /* commlens's own error: counted, and the send goes on unrecorded. */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        commlens_hand_over_error(self->recording_failed, NULL);
    }
    if (call == NULL || call == Py_None) {
        Py_XDECREF(call);
        return PyObject_Vectorcall(self->inner_send, args, nargs, kwnames);
    }
    PyObject *forwarded[SEND_MAX_ARGS + 1];
    for (Py_ssize_t i = 0; i < total; i++)
        forwarded[i + 1] = args[i];
    forwarded[ctxt_at + 1] = ((Send *)call)->ctxt;
    PyObject *result = PyObject_Vectorcall(self->inner_send, forwarded + 1,
                                           nargs | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
    PyObject *raised = result == NULL ? PyErr_GetRaisedException() : NULL;
    PyObject *ended = send_end((Send *)call, raised ? raised : Py_None);
    Py_DECREF(call);
    if (ended == NULL) {
        /* The service's signal arrived while the end was recorded: it goes
         * on, over the inner driver's exception if one was on its way. */
        Py_XDECREF(result);
        commlens_raise_over(raised);
        return NULL;
    }
    Py_DECREF(ended);
    if (raised != NULL)
        PyErr_SetRaisedException(raised);
    return result;
}

/* take_open_calls() -> the tokens of the calls still waiting, forgotten
 * here (the driver's cleanup releases them). */
static PyObject *
sender_take_open_calls(Sender *self, PyObject *Py_UNUSED(unused))
{
    if (self->open_calls == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Sender not initialised");
        return NULL;
    }
    PyObject *fresh = PySet_New(NULL);
    if (fresh == NULL)
        return NULL;
    PyObject *taken = self->open_calls;
    self->open_calls = fresh;
    return taken;
}

static PyMethodDef sender_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))sender_begin, METH_FASTCALL,
     "begin(target, ctxt, message, wait_for_reply) -> Send or None"},
    {"send", (PyCFunction)(void (*)(void))sender_send, METH_FASTCALL | METH_KEYWORDS,
     "send(target, ctxt, message, wait_for_reply=None, ...): the inner driver's send, "
     "recorded"},
    {"take_open_calls", (PyCFunction)sender_take_open_calls, METH_NOARGS,
     "The tokens of the calls still waiting for a reply, forgotten here."},
    {NULL},
};

static PyType_Slot sender_slots[] = {
    {Py_tp_doc, (void *)"Sender(*, service, recorder, ...): the per-send path of one "
                        "rpc_driver.CommlensDriver."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, sender_init},
    {Py_tp_dealloc, sender_dealloc},
    {Py_tp_traverse, sender_traverse},
    {Py_tp_clear, sender_clear},
    {Py_tp_methods, sender_methods},
    {0, NULL},
};

static PyType_Spec sender_spec = {
    .name = "commlens.middleware._rpc_send.Sender",
    .basicsize = sizeof(Sender),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = sender_slots,
};

/* -- Send: one message on its way ----------------------------------------- */

/* How much of its timeout a call that got its reply used (the error path is
 * rpc_driver.py's _record_budget). */
static int
record_budget(Send *self, double used)
{
    Sender *sender = self->sender;
    PyObject *labels = PyTuple_Pack(3, sender->service, self->topic, self->method);
    if (labels == NULL)
        return -1;
    PyObject *used_obj = PyFloat_FromDouble(used);
    if (used_obj == NULL) {
        Py_DECREF(labels);
        return -1;
    }
    /* commlens_record takes (steals) its labels: one reference each. */
    int result = commlens_record(sender->recording.observe, sender->budget_metric,
                                 Py_NewRef(labels), used_obj);
    Py_DECREF(used_obj);
    if (result == 0 && used > BUDGET_OVER)
        result = commlens_record(sender->recording.inc, sender->over_half_metric,
                                 Py_NewRef(labels), NULL);
    Py_DECREF(labels);
    return result;
}

static int
send_record_end(Send *self, PyObject *exc)
{
    Sender *sender = self->sender;
    SendState *state = sender->state;
    double duration = commlens_monotonic() - self->start;
    PyObject *duration_obj = PyFloat_FromDouble(duration);
    if (duration_obj == NULL)
        return -1;
    PyObject *result;
    if (self->token != Py_None) {
        result = PyObject_CallMethodOneArg(sender->recorder, state->str_call_finished,
                                           self->token);
        if (result == NULL)
            goto fail;
        Py_DECREF(result);
        if (PySet_Discard(sender->open_calls, self->token) < 0)
            goto fail;
    }
    if (exc != Py_None) {
        result = PyObject_CallFunctionObjArgs(sender->failed, (PyObject *)self, exc,
                                              duration_obj, NULL);
        goto done;
    }
    if (self->kind == state->str_call && commlens_record(
            sender->recording.observe, sender->reply_wait_metric,
            PyTuple_Pack(4, sender->service, self->topic, self->method, state->str_ok),
            duration_obj) < 0)
        goto fail;
    if (self->kind == state->str_call && self->timeout > 0.0
            && record_budget(self, duration / self->timeout) < 0)
        goto fail;
    int keep = commlens_keeps_hop(&sender->recording,
                                  ((CommlensTraceContext *)self->ctx)->trace_id,
                                  duration_obj, Py_False);
    if (keep < 0)
        goto fail;
    result = keep ? PyObject_CallFunctionObjArgs(sender->add_hop, (PyObject *)self,
                                                 state->str_ok, Py_None, duration_obj, NULL)
                  : Py_NewRef(Py_None);
done:
    if (result == NULL)
        goto fail;
    Py_DECREF(result);
    Py_DECREF(duration_obj);
    return 0;
fail:
    Py_DECREF(duration_obj);
    return -1;
}

/* end(exception or None): the reply came (or the cast went out), or the
 * send raised ``exception``. Once; raises only the service's own signal
 * (commlens_hand_over_error). */
static PyObject *
send_end(Send *self, PyObject *exc)
{
    if (self->done)
        Py_RETURN_NONE;
    self->done = 1;
    if (send_record_end(self, exc) < 0
            && commlens_hand_over_error(self->sender->recording_failed, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
send_traverse(Send *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sender);
    Py_VISIT(self->ctxt);
    Py_VISIT(self->ctx);
    Py_VISIT(self->kind);
    Py_VISIT(self->topic);
    Py_VISIT(self->method);
    Py_VISIT(self->target);
    Py_VISIT(self->token);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
send_clear(Send *self)
{
    Py_CLEAR(self->sender);
    Py_CLEAR(self->ctxt);
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->kind);
    Py_CLEAR(self->topic);
    Py_CLEAR(self->method);
    Py_CLEAR(self->target);
    Py_CLEAR(self->token);
    return 0;
}

static void
send_dealloc(Send *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    send_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *
send_get_start(Send *self, void *Py_UNUSED(closure))
{
    return PyFloat_FromDouble(self->start);
}

static PyObject *
send_get_timeout(Send *self, void *Py_UNUSED(closure))
{
    if (self->timeout > 0.0)
        return PyFloat_FromDouble(self->timeout);
    Py_RETURN_NONE;
}

static PyMethodDef send_methods[] = {
    {"end", (PyCFunction)send_end, METH_O,
     "end(exception or None): record the end of the send, once; raises only a "
     "KeyboardInterrupt or SystemExit that arrived meanwhile."},
    {NULL},
};

static PyGetSetDef send_getset[] = {
    {"start", (getter)send_get_start, NULL, NULL, NULL},
    {"timeout", (getter)send_get_timeout, NULL, NULL, NULL},
    COMMLENS_READONLY_FIELD("ctxt", Send, ctxt),
    COMMLENS_READONLY_FIELD("ctx", Send, ctx),
    COMMLENS_READONLY_FIELD("kind", Send, kind),
    COMMLENS_READONLY_FIELD("topic", Send, topic),
    COMMLENS_READONLY_FIELD("method", Send, method),
    COMMLENS_READONLY_FIELD("target", Send, target),
    COMMLENS_READONLY_FIELD("token", Send, token),
    {NULL},
};

static PyType_Slot send_slots[] = {
    {Py_tp_doc, (void *)"One message on its way: made by Sender.begin, ended by end()."},
    {Py_tp_dealloc, send_dealloc},
    {Py_tp_traverse, send_traverse},
    {Py_tp_clear, send_clear},
    {Py_tp_methods, send_methods},
    {Py_tp_getset, send_getset},
    {0, NULL},
};

static PyType_Spec send_spec = {
    .name = "commlens.middleware._rpc_send.Send",
    .basicsize = sizeof(Send),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE
        | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = send_slots,
};

/* -- module --------------------------------------------------------------- */

static int
send_exec(PyObject *module)
{
    SendState *state = PyModule_GetState(module);
    /* The kinds and "ok" are the labels rpc_driver.py and metrics.py use:
     * interned, so they are the same objects as those constants. */
#define INTERN(name, text) \
    if ((state->str_##name = PyUnicode_InternFromString(text)) == NULL) return -1;
    SEND_STRINGS(INTERN)
#undef INTERN
    state->sender_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &sender_spec, NULL);
    if (state->sender_type == NULL || PyModule_AddType(module, state->sender_type) < 0)
        return -1;
    state->send_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &send_spec, NULL);
    if (state->send_type == NULL || PyModule_AddType(module, state->send_type) < 0)
        return -1;
    return 0;
}

static int
send_traverse_module(PyObject *module, visitproc visit, void *arg)
{
    SendState *state = PyModule_GetState(module);
    Py_VISIT(state->sender_type);
    Py_VISIT(state->send_type);
    return 0;
}

/* The types, which refer to the module, go when it is collected; the
 * strings, which refer to nothing, when it is freed. */
static int
send_clear_module(PyObject *module)
{
    SendState *state = PyModule_GetState(module);
    Py_CLEAR(state->sender_type);
    Py_CLEAR(state->send_type);
    return 0;
}

static void
send_free_module(void *module)
{
    SendState *state = PyModule_GetState((PyObject *)module);
    send_clear_module((PyObject *)module);
#define CLEAR(name, text) Py_CLEAR(state->str_##name);
    SEND_STRINGS(CLEAR)
#undef CLEAR
}

static PyModuleDef_Slot send_slots_module[] = {
    {Py_mod_exec, send_exec},
    COMMLENS_SLOT_INTERPRETERS
    COMMLENS_SLOT_GIL
    {0, NULL},
};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_rpc_send",
    .m_doc = "The RPC client's per-send path, compiled (see middleware/rpc_driver.py).",
    .m_size = sizeof(SendState),
    .m_slots = send_slots_module,
    .m_traverse = send_traverse_module,
    .m_clear = send_clear_module,
    .m_free = send_free_module,
};

PyMODINIT_FUNC
PyInit__rpc_send(void)
{
    return PyModuleDef_Init(&module_def);
}
