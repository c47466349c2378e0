/* The RPC server's per-message path, compiled.
 *
 * middleware/rpc_driver.py is the driver wrapper; this file is only what
 * runs for every RPC message a service receives, from its receipt to its
 * reply, and rpc_driver.py says what is recorded and why. A Receiver (one
 * per listener) reads the message context and counts the message; the
 * Incoming it returns is what the RPC server acknowledges, replies to or
 * requeues, and times the processing in between. From the receipt to the
 * acknowledgement (dispatch) is the message's pool wait; from there to the
 * reply it is one of the handlers in flight of its listener's Pool.
 *
 * The message context's common case is read here: no traceparent or a
 * version-00 one, no baggage or exactly our member. Anything else (and a
 * context that is not a dict) goes to rpc_driver.py's Python, which is the
 * reference for what this file does; so do a failed processing and a hop
 * to ship.
 *
 * Why C: as for the client (middleware/_rpc_send.c), the same path in
 * Python cost a server about 40 µs per message between its socket reads,
 * and every call waits for it.
 *
 * Every function called with the GIL held, as CPython calls them; nothing
 * here releases it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "../tracer/_speedups.h"

/* -- the module's state --------------------------------------------------- */

/* One per interpreter that imports commlens (multi-phase init, PEP 489): its
 * types and the strings it reads, interned in that interpreter. */
#define RECEIVE_STRINGS(X) \
    X(traceparent) X(baggage) X(ctxt) X(message) X(msg_id) X(orig_msg_id) \
    X(client_timeout) X(method) X(call) X(cast) X(fanout) X(unknown) X(ok) \
    X(acknowledge) X(requeue) X(heartbeat) X(reply) X(failure)

typedef struct {
    PyTypeObject *receiver_type;
    PyTypeObject *incoming_type;
    PyTypeObject *pool_type;
#define FIELD(name) PyObject *str_##name;
    RECEIVE_STRINGS(FIELD)
#undef FIELD
    PyObject *kw_reply_failure;  /* ("reply", "failure") */
} ReceiveState;

/* -- reading the message context ------------------------------------------ */

static int
is_lower_hex(const Py_UCS1 *text, Py_ssize_t length, int *all_zero)
{
    *all_zero = 1;
    for (Py_ssize_t i = 0; i < length; i++) {
        Py_UCS1 c = text[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
        if (c != '0')
            *all_zero = 0;
    }
    return 1;
}

/* A version-00 traceparent as every sender writes it: 1 and the trace id,
 * the parent id and the sampled flag; 0 if it is anything else (the Python
 * parser decides: a later version, or not valid). */
static int
parse_traceparent_00(PyObject *value, PyObject **trace_id, PyObject **parent_id, int *sampled)
{
    if (!PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value)
            || PyUnicode_GET_LENGTH(value) != 55)
        return 0;
    const Py_UCS1 *text = PyUnicode_1BYTE_DATA(value);
    int zero_trace, zero_parent, zero_flags;
    if (text[0] != '0' || text[1] != '0' || text[2] != '-' || text[35] != '-'
            || text[52] != '-' || !is_lower_hex(text + 3, 32, &zero_trace)
            || !is_lower_hex(text + 36, 16, &zero_parent)
            || !is_lower_hex(text + 53, 2, &zero_flags) || zero_trace || zero_parent)
        return 0;
    Py_UCS1 last = text[54];
    *sampled = (last >= 'a' ? last - 'a' + 10 : last - '0') & 1;
    *trace_id = PyUnicode_Substring(value, 3, 35);
    *parent_id = *trace_id ? PyUnicode_Substring(value, 36, 52) : NULL;
    if (*parent_id == NULL) {
        Py_CLEAR(*trace_id);
        return -1;
    }
    return 1;
}

static int
name_char(Py_UCS1 c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
        || c == '_' || c == '.' || c == '-';
}

/* Baggage that is exactly our member, ``commlens.service=NAME;kind=KIND;
 * span=SPAN`` (context.with_baggage_sender's, alone): 1 and its three
 * parts; 0 if it is anything else (the Python parser decides). */
static int
parse_sender_member(PyObject *value, PyObject **service, PyObject **kind, PyObject **span)
{
    static const char prefix[] = "commlens.service=";
    const Py_ssize_t prefix_length = sizeof(prefix) - 1;
    if (!PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value))
        return 0;
    const Py_UCS1 *text = PyUnicode_1BYTE_DATA(value);
    Py_ssize_t length = PyUnicode_GET_LENGTH(value);
    if (length < prefix_length || memcmp(text, prefix, prefix_length) != 0)
        return 0;
    Py_ssize_t name_start = prefix_length, name_end = name_start;
    while (name_end < length && name_char(text[name_end]))
        name_end++;
    Py_ssize_t name_length = name_end - name_start;
    if (name_length < 1 || name_length > 64 || text[name_start] == '_'
            || text[name_start] == '.' || text[name_start] == '-'
            || length - name_end < 6 || memcmp(text + name_end, ";kind=", 6) != 0)
        return 0;
    Py_ssize_t kind_start = name_end + 6, kind_end = kind_start;
    while (kind_end < length && text[kind_end] >= 'a' && text[kind_end] <= 'z')
        kind_end++;
    int all_zero;
    if (kind_end - kind_start < 1 || kind_end - kind_start > 16
            || length - kind_end != 6 + 16 || memcmp(text + kind_end, ";span=", 6) != 0
            || !is_lower_hex(text + kind_end + 6, 16, &all_zero))
        return 0;
    *service = PyUnicode_Substring(value, name_start, name_end);
    *kind = *service ? PyUnicode_Substring(value, kind_start, kind_end) : NULL;
    *span = *kind ? PyUnicode_Substring(value, kind_end + 6, length) : NULL;
    if (*span == NULL) {
        Py_CLEAR(*service);
        Py_CLEAR(*kind);
        return -1;
    }
    return 1;
}

/* -- Pool: the handlers in flight of one RPC server's executor pool ------- */

/* Shared by the Receivers one listener makes (a renamed listener makes a new
 * one and keeps counting the messages in flight). Only ever changed with the
 * GIL held, so the counts need no lock. */
typedef struct {
    PyObject_HEAD
    Py_ssize_t size;       /* executor_thread_pool_size; 0 while unknown */
    Py_ssize_t in_flight;  /* dispatched, not replied */
    Py_ssize_t peak;       /* the most in flight since the last take_peak() */
} Pool;

static int pool_set_size(Pool *self, PyObject *value, void *closure);

static int
pool_init(Pool *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"size", NULL};
    PyObject *size = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:Pool", keywords, &size))
        return -1;
    return size == NULL ? 0 : pool_set_size(self, size, NULL);
}

static void
pool_dealloc(Pool *self)
{
    PyTypeObject *type = Py_TYPE(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static void
pool_dispatched(Pool *self)
{
    self->in_flight++;
    if (self->in_flight > self->peak)
        self->peak = self->in_flight;
}

static void
pool_done(Pool *self)
{
    if (self->in_flight > 0)
        self->in_flight--;
}

static PyObject *
pool_dispatched_method(Pool *self, PyObject *Py_UNUSED(unused))
{
    pool_dispatched(self);
    Py_RETURN_NONE;
}

static PyObject *
pool_done_method(Pool *self, PyObject *Py_UNUSED(unused))
{
    pool_done(self);
    Py_RETURN_NONE;
}

/* The most handlers in flight at once since the last call; the next
 * interval's peak starts from those in flight now. */
static PyObject *
pool_take_peak(Pool *self, PyObject *Py_UNUSED(unused))
{
    Py_ssize_t peak = self->peak;
    self->peak = self->in_flight;
    return PyLong_FromSsize_t(peak);
}

static PyObject *
pool_get_size(Pool *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->size);
}

static int
pool_set_size(Pool *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a pool's size cannot be deleted");
        return -1;
    }
    PyObject *index = PyNumber_Index(value);
    if (index == NULL)
        return -1;
    Py_ssize_t size = PyNumber_AsSsize_t(index, PyExc_OverflowError);
    Py_DECREF(index);
    if (size == -1 && PyErr_Occurred())
        return -1;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "pool size: not negative");
        return -1;
    }
    self->size = size;
    return 0;
}

static PyObject *
pool_get_in_flight(Pool *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->in_flight);
}

static PyMethodDef pool_methods[] = {
    {"dispatched", (PyCFunction)pool_dispatched_method, METH_NOARGS, NULL},
    {"done", (PyCFunction)pool_done_method, METH_NOARGS, NULL},
    {"take_peak", (PyCFunction)pool_take_peak, METH_NOARGS,
     "take_peak() -> the most handlers in flight at once since the last call."},
    {NULL},
};

static PyGetSetDef pool_getset[] = {
    {"size", (getter)pool_get_size, (setter)pool_set_size, NULL, NULL},
    {"in_flight", (getter)pool_get_in_flight, NULL, NULL, NULL},
    {NULL},
};

static PyType_Slot pool_slots[] = {
    {Py_tp_doc, (void *)"Pool(size=0): the handlers in flight of one RPC server's "
                        "executor pool."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, pool_init},
    {Py_tp_dealloc, pool_dealloc},
    {Py_tp_methods, pool_methods},
    {Py_tp_getset, pool_getset},
    {0, NULL},
};

static PyType_Spec pool_spec = {
    .name = "commlens.middleware._rpc_receive.Pool",
    .basicsize = sizeof(Pool),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = pool_slots,
};

/* -- Receiver: one per listener ------------------------------------------- */

typedef struct {
    PyObject_HEAD
    /* Its module's, read for every message. Borrowed: the Receiver holds
     * its type, which holds the module. */
    ReceiveState *state;
    PyObject *service;
    PyObject *topic;
    CommlensRecording recording;
    PyObject *received_metric;   /* metrics.RPC_RECEIVED.name */
    PyObject *hops_metric;       /* metrics.RPC_SERVER_HOPS.name */
    PyObject *pool_wait_metric;  /* metrics.RPC_POOL_WAIT.name */
    PyObject *pool;              /* the listener's Pool */
    PyObject *method_seen;       /* labels.method.seen */
    PyObject *method_label;      /* labels.method */
    PyTypeObject *incoming_type; /* rpc_driver._InstrumentedIncoming */
    PyTypeObject *trace_context; /* context.TraceContext */
    PyObject *current;           /* ContextVar of the hop being served */
    PyObject *in_python;         /* (message) -> the general case */
    PyObject *failed;            /* (incoming, failure, duration) */
    PyObject *add_hop;           /* (incoming, outcome, error, duration) */
    PyObject *recording_failed;  /* (exception) */
} Receiver;

typedef struct {
    PyObject_HEAD
    Receiver *receiver;
    PyObject *inner;        /* the driver's message */
    PyObject *ctxt;
    PyObject *message;
    PyObject *msg_id;
    PyObject *client_timeout;
    PyObject *ctx;          /* the hop's TraceContext */
    PyObject *caller;
    PyObject *method;
    PyObject *kind;
    PyObject *context_token;
    double received;        /* handed to the RPC server */
    double start;           /* dispatched (acknowledged) */
    double end;
    char dispatched;
    char done;
} Incoming;

#define RECEIVER_FIELDS(X) \
    X(service) X(topic) X(received_metric) X(hops_metric) X(pool_wait_metric) X(pool) \
    X(method_seen) X(method_label) X(current) X(in_python) X(failed) X(add_hop) \
    X(recording_failed)

static int
receiver_traverse(Receiver *self, visitproc visit, void *arg)
{
#define VISIT(field) Py_VISIT(self->field);
    RECEIVER_FIELDS(VISIT)
#undef VISIT
    COMMLENS_RECORDING_VISIT(self->recording);
    Py_VISIT(self->incoming_type);
    Py_VISIT(self->trace_context);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
receiver_clear(Receiver *self)
{
#define CLEAR(field) Py_CLEAR(self->field);
    RECEIVER_FIELDS(CLEAR)
#undef CLEAR
    COMMLENS_RECORDING_CLEAR(self->recording);
    Py_CLEAR(self->incoming_type);
    Py_CLEAR(self->trace_context);
    return 0;
}

static void
receiver_dealloc(Receiver *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    receiver_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static int
receiver_init(Receiver *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "service", "topic", "recorder", "received_metric", "hops_metric",
        "pool_wait_metric", "pool", "method_label", "incoming_type", "trace_context",
        "current", "in_python", "failed", "add_hop", "recording_failed", NULL};
    PyObject *service, *topic, *recorder, *received, *hops, *pool_wait, *pool, *method_label,
        *incoming_type, *trace_context, *current, *in_python, *failed, *add_hop,
        *recording_failed;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "$UUOUUUOOO!O!O!OOOO:Receiver", keywords, &service, &topic,
            &recorder, &received, &hops, &pool_wait, &pool, &method_label, &PyType_Type,
            &incoming_type, &PyType_Type, &trace_context, &PyContextVar_Type, &current,
            &in_python, &failed, &add_hop, &recording_failed))
        return -1;
    ReceiveState *state = PyType_GetModuleState(Py_TYPE(self));
    if (state == NULL)
        return -1;
    self->state = state;
    if (!PyType_IsSubtype((PyTypeObject *)incoming_type, state->incoming_type)) {
        PyErr_SetString(PyExc_TypeError, "incoming_type: a subclass of Incoming");
        return -1;
    }
    /* Exactly this module's Pool: its counts are changed here directly. */
    if (Py_TYPE(pool) != state->pool_type) {
        PyErr_SetString(PyExc_TypeError, "pool: a Pool");
        return -1;
    }
    if (commlens_check_trace_context_type(trace_context) < 0
            || commlens_recording_init(&self->recording, recorder) < 0)
        return -1;
    PyObject *seen = commlens_method_seen(method_label);
    if (seen == NULL)
        return -1;
    Py_XSETREF(self->method_seen, seen);
    Py_XSETREF(self->service, Py_NewRef(service));
    Py_XSETREF(self->topic, Py_NewRef(topic));
    Py_XSETREF(self->received_metric, Py_NewRef(received));
    Py_XSETREF(self->hops_metric, Py_NewRef(hops));
    Py_XSETREF(self->pool_wait_metric, Py_NewRef(pool_wait));
    Py_XSETREF(self->pool, Py_NewRef(pool));
    Py_XSETREF(self->method_label, Py_NewRef(method_label));
    Py_XSETREF(self->incoming_type, (PyTypeObject *)Py_NewRef(incoming_type));
    Py_XSETREF(self->trace_context, (PyTypeObject *)Py_NewRef(trace_context));
    Py_XSETREF(self->current, Py_NewRef(current));
    Py_XSETREF(self->in_python, Py_NewRef(in_python));
    Py_XSETREF(self->failed, Py_NewRef(failed));
    Py_XSETREF(self->add_hop, Py_NewRef(add_hop));
    Py_XSETREF(self->recording_failed, Py_NewRef(recording_failed));
    return 0;
}

/* The method label of a message body (a dict's "method", else none). */
static PyObject *
method_label(Receiver *self, PyObject *body)
{
    PyObject *raw = Py_None;
    if (PyDict_Check(body)) {
        raw = PyDict_GetItemWithError(body, self->state->str_method);
        if (raw == NULL) {
            if (PyErr_Occurred())
                return NULL;
            raw = Py_None;
        }
    }
    return commlens_method_label(self->method_seen, self->method_label, raw);
}

/* An Incoming wrapping ``inner``, counted; takes the references it is given. */
static PyObject *
make_incoming(Receiver *self, PyObject *inner, PyObject *ctxt, PyObject *ctx,
              PyObject *caller, PyObject *method, PyObject *kind)
{
    if (commlens_record(self->recording.inc, self->received_metric,
                        PyTuple_Pack(5, self->service, caller, self->topic, method, kind),
                        NULL) < 0)
        goto fail;
    Incoming *incoming = (Incoming *)self->incoming_type->tp_alloc(self->incoming_type, 0);
    if (incoming == NULL)
        goto fail;
    incoming->receiver = (Receiver *)Py_NewRef(self);
    incoming->inner = Py_NewRef(inner);
    incoming->ctxt = ctxt;
    incoming->ctx = ctx;
    incoming->caller = caller;
    incoming->method = method;
    incoming->kind = kind;
    incoming->received = incoming->start = incoming->end = commlens_monotonic();
    /* What the RPC server reads of a message, as the inner one has it. */
    ReceiveState *state = self->state;
    if ((incoming->message = PyObject_GetAttr(inner, state->str_message)) == NULL
            || (incoming->msg_id = PyObject_GetAttr(inner, state->str_msg_id)) == NULL
            || commlens_optional_attr(inner, state->str_client_timeout,
                                               &incoming->client_timeout) < 0) {
        Py_DECREF(incoming);
        return NULL;
    }
    if (incoming->client_timeout == NULL)
        incoming->client_timeout = Py_NewRef(Py_None);
    return (PyObject *)incoming;
fail:
    Py_DECREF(ctxt);
    Py_DECREF(ctx);
    Py_DECREF(caller);
    Py_DECREF(method);
    Py_DECREF(kind);
    return NULL;
}

/* wrap(message) -> the Incoming to hand to the RPC server. */
static PyObject *
receiver_wrap(Receiver *self, PyObject *inner)
{
    if (self->service == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver not initialised");
        return NULL;
    }
    ReceiveState *state = self->state;
    PyObject *ctxt = PyObject_GetAttr(inner, state->str_ctxt);
    if (ctxt == NULL)
        return NULL;
    PyObject *traceparent = NULL, *baggage = NULL;
    if (!PyDict_CheckExact(ctxt)
            || ((traceparent = PyDict_GetItemWithError(ctxt, state->str_traceparent)) == NULL
                && PyErr_Occurred())
            || ((baggage = PyDict_GetItemWithError(ctxt, state->str_baggage)) == NULL
                && PyErr_Occurred())) {
        Py_DECREF(ctxt);
        return PyErr_Occurred() ? NULL : PyObject_CallOneArg(self->in_python, inner);
    }
    PyObject *trace_id = NULL, *parent_id = NULL;
    int sampled = 1;
    if (traceparent != NULL && traceparent != Py_None) {
        int parsed = parse_traceparent_00(traceparent, &trace_id, &parent_id, &sampled);
        if (parsed <= 0) {
            Py_DECREF(ctxt);
            return parsed < 0 ? NULL : PyObject_CallOneArg(self->in_python, inner);
        }
    }
    PyObject *sender = NULL, *sent_kind = NULL, *span = NULL;
    if (baggage != NULL && baggage != Py_None) {
        int parsed = parse_sender_member(baggage, &sender, &sent_kind, &span);
        if (parsed <= 0) {
            Py_XDECREF(trace_id);
            Py_XDECREF(parent_id);
            Py_DECREF(ctxt);
            return parsed < 0 ? NULL : PyObject_CallOneArg(self->in_python, inner);
        }
        /* Only the member written by the hop's own parent names the caller
         * (context.parse_baggage_sender). */
        if (parent_id == NULL || PyUnicode_Compare(span, parent_id) != 0) {
            Py_CLEAR(sender);
            Py_CLEAR(sent_kind);
        }
        Py_DECREF(span);
    }
    CommlensTraceContext *ctx =
        (CommlensTraceContext *)commlens_trace_context_new(self->trace_context);
    if (ctx == NULL)
        goto fail;
    if (trace_id != NULL) {
        Py_SETREF(ctx->trace_id, trace_id);
        Py_SETREF(ctx->parent_id, parent_id);
        Py_SETREF(ctx->sampled, Py_NewRef(sampled ? Py_True : Py_False));
        trace_id = parent_id = NULL;
    }
    Py_SETREF(ctx->service, Py_NewRef(self->service));

    PyObject *kind = NULL;
    if (sent_kind != NULL && (PyUnicode_Compare(sent_kind, state->str_call) == 0
                              || PyUnicode_Compare(sent_kind, state->str_cast) == 0
                              || PyUnicode_Compare(sent_kind, state->str_fanout) == 0)) {
        kind = sent_kind;
        sent_kind = NULL;
    } else {
        /* An uninstrumented sender: a reply is expected only for a call. A
         * fanout from such a sender is counted as a cast. */
        PyObject *orig_msg_id = NULL;
        if (commlens_optional_attr(inner, state->str_orig_msg_id, &orig_msg_id) < 0)
            goto fail_ctx;
        int call = orig_msg_id != NULL ? PyObject_IsTrue(orig_msg_id) : 0;
        Py_XDECREF(orig_msg_id);
        if (call == 0) {
            PyObject *msg_id = PyDict_GetItemWithError(ctxt, state->str_msg_id);
            call = msg_id != NULL ? PyObject_IsTrue(msg_id) : (PyErr_Occurred() ? -1 : 0);
        }
        if (call < 0)
            goto fail_ctx;
        kind = Py_NewRef(call ? state->str_call : state->str_cast);
    }
    Py_CLEAR(sent_kind);
    PyObject *body = PyObject_GetAttr(inner, state->str_message);
    PyObject *method = body ? method_label(self, body) : NULL;
    Py_XDECREF(body);
    if (method == NULL) {
        Py_DECREF(kind);
        goto fail_ctx;
    }
    return make_incoming(self, inner, ctxt, (PyObject *)ctx,
                         sender ? sender : Py_NewRef(state->str_unknown), method, kind);
fail_ctx:
    Py_DECREF(ctx);
fail:
    Py_XDECREF(trace_id);
    Py_XDECREF(parent_id);
    Py_XDECREF(sender);
    Py_XDECREF(sent_kind);
    Py_DECREF(ctxt);
    return NULL;
}

/* incoming(message, ctx, caller, method, kind): the Incoming of a message
 * whose context the Python side read (rpc_driver.py's general case). */
static PyObject *
receiver_incoming(Receiver *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "incoming(message, ctx, caller, method, kind)");
        return NULL;
    }
    if (self->service == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver not initialised");
        return NULL;
    }
    if (Py_TYPE(args[1]) != self->trace_context) {
        PyErr_SetString(PyExc_TypeError, "incoming: ctx is not a TraceContext");
        return NULL;
    }
    PyObject *ctxt = PyObject_GetAttr(args[0], self->state->str_ctxt);
    if (ctxt == NULL)
        return NULL;
    return make_incoming(self, args[0], ctxt, Py_NewRef(args[1]), Py_NewRef(args[2]),
                         Py_NewRef(args[3]), Py_NewRef(args[4]));
}

static PyMethodDef receiver_methods[] = {
    {"wrap", (PyCFunction)receiver_wrap, METH_O,
     "wrap(message) -> the Incoming the RPC server gets, the message counted."},
    {"incoming", (PyCFunction)(void (*)(void))receiver_incoming, METH_FASTCALL,
     "incoming(message, ctx, caller, method, kind) -> Incoming, counted."},
    {NULL},
};

static PyType_Slot receiver_slots[] = {
    {Py_tp_doc, (void *)"Receiver(*, service, topic, recorder, ...): the per-message path "
                        "of one rpc_driver._InstrumentedListener."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, receiver_init},
    {Py_tp_dealloc, receiver_dealloc},
    {Py_tp_traverse, receiver_traverse},
    {Py_tp_clear, receiver_clear},
    {Py_tp_methods, receiver_methods},
    {0, NULL},
};

static PyType_Spec receiver_spec = {
    .name = "commlens.middleware._rpc_receive.Receiver",
    .basicsize = sizeof(Receiver),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = receiver_slots,
};

/* -- Incoming: one message from receipt to reply -------------------------- */

#define INCOMING_FIELDS(X) \
    X(inner) X(ctxt) X(message) X(msg_id) X(client_timeout) X(ctx) X(caller) X(method) \
    X(kind) X(context_token)

static int
incoming_traverse(Incoming *self, visitproc visit, void *arg)
{
    Py_VISIT(self->receiver);
#define VISIT(field) Py_VISIT(self->field);
    INCOMING_FIELDS(VISIT)
#undef VISIT
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
incoming_clear(Incoming *self)
{
    Py_CLEAR(self->receiver);
#define CLEAR(field) Py_CLEAR(self->field);
    INCOMING_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
incoming_dealloc(Incoming *self)
{
    /* rpc_driver._InstrumentedIncoming's subtype_dealloc comes here and
     * leaves the subclass to it: the base is a heap type. */
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    incoming_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* The processing ended (``failure``: None, an exception or an exc_info). */
static int
incoming_record(Incoming *self, PyObject *failure)
{
    Receiver *receiver = self->receiver;
    if (self->context_token != NULL) {
        PyObject *token = self->context_token;
        self->context_token = NULL;
        int reset = PyContextVar_Reset(receiver->current, token);
        Py_DECREF(token);
        if (reset < 0) {
            /* The reply came from another context (another thread): the
             * hop is no longer served there either (context.reset_current). */
            if (!PyErr_ExceptionMatches(PyExc_ValueError))
                return -1;
            PyErr_Clear();
            PyObject *other = PyContextVar_Set(receiver->current, Py_None);
            if (other == NULL)
                return -1;
            Py_DECREF(other);
        }
    }
    PyObject *duration = PyFloat_FromDouble(self->end - self->start);
    if (duration == NULL)
        return -1;
    PyObject *result;
    if (failure != Py_None) {
        result = PyObject_CallFunctionObjArgs(receiver->failed, (PyObject *)self, failure,
                                              duration, NULL);
        goto done;
    }
    /* One update for the processing metrics and the graph edge alike
     * (tracer/derived.py). */
    if (commlens_record(receiver->recording.observe, receiver->hops_metric,
                        PyTuple_Pack(5, receiver->service, self->caller, receiver->topic,
                                     self->method, receiver->state->str_ok),
                        duration) < 0)
        goto fail;
    CommlensTraceContext *ctx = (CommlensTraceContext *)self->ctx;
    int keep = commlens_keeps_hop(&receiver->recording, ctx->trace_id, duration,
                                  ctx->child_failed);
    if (keep < 0)
        goto fail;
    result = keep ? PyObject_CallFunctionObjArgs(receiver->add_hop, (PyObject *)self,
                                                 receiver->state->str_ok, Py_None, duration,
                                                 NULL)
                  : Py_NewRef(Py_None);
done:
    if (result == NULL)
        goto fail;
    Py_DECREF(result);
    Py_DECREF(duration);
    return 0;
fail:
    Py_DECREF(duration);
    return -1;
}

/* Records once, the inner call's exception (if any) left pending; -1 if
 * the service's signal arrived meanwhile (commlens_hand_over_error), which
 * then goes on instead, the inner call's exception as its context. */
static int
incoming_finish(Incoming *self, PyObject *failure)
{
    if (self->done)
        return 0;
    self->done = 1;
    if (self->dispatched)
        pool_done((Pool *)self->receiver->pool);
    PyObject *pending = PyErr_GetRaisedException();  /* the inner call's, if any */
    if (incoming_record(self, failure) < 0
            && commlens_hand_over_error(self->receiver->recording_failed, NULL) < 0) {
        commlens_raise_over(pending);
        return -1;
    }
    PyErr_SetRaisedException(pending);
    return 0;
}

static PyObject *
incoming_acknowledge(Incoming *self, PyObject *Py_UNUSED(unused))
{
    PyObject *result = PyObject_CallMethodNoArgs(self->inner,
                                                 self->receiver->state->str_acknowledge);
    if (result == NULL)
        return NULL;
    /* Dispatch starts: the hop is the one served until the reply, so the
     * calls its endpoint makes are its children. */
    self->start = commlens_monotonic();
    Receiver *receiver = self->receiver;
    if (!self->dispatched) {
        self->dispatched = 1;
        pool_dispatched((Pool *)receiver->pool);
        PyObject *waited = PyFloat_FromDouble(self->start - self->received);
        if ((waited == NULL
                || commlens_record(receiver->recording.observe, receiver->pool_wait_metric,
                                   PyTuple_Pack(3, receiver->service, receiver->topic,
                                                self->method), waited) < 0)
                && commlens_hand_over_error(receiver->recording_failed, NULL) < 0) {
            Py_XDECREF(waited);
            Py_DECREF(result);
            return NULL;
        }
        Py_XDECREF(waited);
    }
    PyObject *token = PyContextVar_Set(receiver->current, self->ctx);
    if (token == NULL
            && commlens_hand_over_error(receiver->recording_failed, NULL) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    Py_XSETREF(self->context_token, token);
    return result;
}

/* reply(reply=None, failure=None): the processing time ends before the
 * reply goes out; the recording is done after, so the caller does not wait
 * for it. */
static PyObject *
incoming_reply(Incoming *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"reply", "failure", NULL};
    PyObject *reply = Py_None, *failure = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO:reply", keywords, &reply, &failure))
        return NULL;
    self->end = commlens_monotonic();
    ReceiveState *state = self->receiver->state;
    PyObject *call_args[] = {self->inner, reply, failure};
    PyObject *result = PyObject_VectorcallMethod(state->str_reply, call_args, 1,
                                                 state->kw_reply_failure);
    if (incoming_finish(self, failure) < 0)
        Py_CLEAR(result);
    return result;
}

static PyObject *
incoming_requeue(Incoming *self, PyObject *Py_UNUSED(unused))
{
    self->end = commlens_monotonic();
    PyObject *result = PyObject_CallMethodNoArgs(self->inner,
                                                 self->receiver->state->str_requeue);
    if (incoming_finish(self, Py_None) < 0)
        Py_CLEAR(result);
    return result;
}

static PyObject *
incoming_heartbeat(Incoming *self, PyObject *Py_UNUSED(unused))
{
    return PyObject_CallMethodNoArgs(self->inner, self->receiver->state->str_heartbeat);
}

static PyObject *
incoming_get_start(Incoming *self, void *Py_UNUSED(closure))
{
    return PyFloat_FromDouble(self->start);
}

/* Seconds from receipt to dispatch; None until dispatched. */
static PyObject *
incoming_get_pool_wait(Incoming *self, void *Py_UNUSED(closure))
{
    if (!self->dispatched)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(self->start - self->received);
}

static PyObject *
incoming_get_received(Incoming *self, void *Py_UNUSED(closure))
{
    return PyFloat_FromDouble(self->received);
}

static PyObject *
incoming_get_topic(Incoming *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->receiver->topic);
}

static PyMethodDef incoming_methods[] = {
    {"acknowledge", (PyCFunction)incoming_acknowledge, METH_NOARGS, NULL},
    {"reply", (PyCFunction)(void (*)(void))incoming_reply, METH_VARARGS | METH_KEYWORDS,
     NULL},
    {"requeue", (PyCFunction)incoming_requeue, METH_NOARGS, NULL},
    {"heartbeat", (PyCFunction)incoming_heartbeat, METH_NOARGS, NULL},
    {NULL},
};

/* What the RPC server may replace of a message (its context, body, id,
 * timeout), as on the driver's own message; never deleted, since those
 * who read them expect a value. */
static int
incoming_set_field(PyObject *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a message's field cannot be deleted");
        return -1;
    }
    Py_XSETREF(*(PyObject **)((char *)self + (intptr_t)closure), Py_NewRef(value));
    return 0;
}

#define INCOMING_WRITABLE_FIELD(field) \
    {#field, (getter)commlens_get_field, (setter)incoming_set_field, NULL, \
     (void *)offsetof(Incoming, field)}

static PyGetSetDef incoming_getset[] = {
    {"start", (getter)incoming_get_start, NULL, NULL, NULL},
    {"received", (getter)incoming_get_received, NULL, NULL, NULL},
    {"pool_wait", (getter)incoming_get_pool_wait, NULL, NULL, NULL},
    {"topic", (getter)incoming_get_topic, NULL, NULL, NULL},
    COMMLENS_READONLY_FIELD("inner", Incoming, inner),
    INCOMING_WRITABLE_FIELD(ctxt),
    INCOMING_WRITABLE_FIELD(message),
    INCOMING_WRITABLE_FIELD(msg_id),
    INCOMING_WRITABLE_FIELD(client_timeout),
    COMMLENS_READONLY_FIELD("ctx", Incoming, ctx),
    COMMLENS_READONLY_FIELD("caller", Incoming, caller),
    COMMLENS_READONLY_FIELD("method", Incoming, method),
    COMMLENS_READONLY_FIELD("kind", Incoming, kind),
    {NULL},
};

static PyType_Slot incoming_slots[] = {
    {Py_tp_doc, (void *)"One RPC message from receipt to reply "
                        "(rpc_driver._InstrumentedIncoming)."},
    {Py_tp_dealloc, incoming_dealloc},
    {Py_tp_traverse, incoming_traverse},
    {Py_tp_clear, incoming_clear},
    {Py_tp_methods, incoming_methods},
    {Py_tp_getset, incoming_getset},
    {0, NULL},
};

/* Made only through its Python subclass (Receiver's incoming_type). */
static PyType_Spec incoming_spec = {
    .name = "commlens.middleware._rpc_receive.Incoming",
    .basicsize = sizeof(Incoming),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC
        | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = incoming_slots,
};

/* -- module --------------------------------------------------------------- */

static int
receive_exec(PyObject *module)
{
    ReceiveState *state = PyModule_GetState(module);
#define INTERN(name) \
    if ((state->str_##name = PyUnicode_InternFromString(#name)) == NULL) return -1;
    RECEIVE_STRINGS(INTERN)
#undef INTERN
    state->kw_reply_failure = PyTuple_Pack(2, state->str_reply, state->str_failure);
    if (state->kw_reply_failure == NULL)
        return -1;
    state->receiver_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &receiver_spec, NULL);
    if (state->receiver_type == NULL || PyModule_AddType(module, state->receiver_type) < 0)
        return -1;
    state->incoming_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &incoming_spec, NULL);
    if (state->incoming_type == NULL || PyModule_AddType(module, state->incoming_type) < 0)
        return -1;
    state->pool_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &pool_spec, NULL);
    if (state->pool_type == NULL || PyModule_AddType(module, state->pool_type) < 0)
        return -1;
    return 0;
}

static int
receive_traverse_module(PyObject *module, visitproc visit, void *arg)
{
    ReceiveState *state = PyModule_GetState(module);
    Py_VISIT(state->receiver_type);
    Py_VISIT(state->incoming_type);
    Py_VISIT(state->pool_type);
    return 0;
}

/* The types, which refer to the module, go when it is collected; the
 * strings, which refer to nothing, when it is freed. */
static int
receive_clear_module(PyObject *module)
{
    ReceiveState *state = PyModule_GetState(module);
    Py_CLEAR(state->receiver_type);
    Py_CLEAR(state->incoming_type);
    Py_CLEAR(state->pool_type);
    return 0;
}

static void
receive_free_module(void *module)
{
    ReceiveState *state = PyModule_GetState((PyObject *)module);
    receive_clear_module((PyObject *)module);
#define CLEAR(name) Py_CLEAR(state->str_##name);
    RECEIVE_STRINGS(CLEAR)
#undef CLEAR
    Py_CLEAR(state->kw_reply_failure);
}

static PyModuleDef_Slot receive_slots[] = {
    {Py_mod_exec, receive_exec},
    COMMLENS_SLOT_INTERPRETERS
    COMMLENS_SLOT_GIL
    {0, NULL},
};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_rpc_receive",
    .m_doc = "The RPC server's per-message path, compiled (see middleware/rpc_driver.py).",
    .m_size = sizeof(ReceiveState),
    .m_slots = receive_slots,
    .m_traverse = receive_traverse_module,
    .m_clear = receive_clear_module,
    .m_free = receive_free_module,
};

PyMODINIT_FUNC
PyInit__rpc_receive(void)
{
    return PyModuleDef_Init(&module_def);
}
