/* The tracer's per-hop types, compiled: what every request and message
 * goes through, where a Python frame more is a measurable share of a fast
 * request (docs/benchmarks.md).
 *
 * - Counter, Histogram: one series of the recorder (tracer/recorder.py),
 *   updated without a lock. Each update is one C call that runs no Python
 *   code and does not release the GIL, so it is atomic against the
 *   service's other threads and against the shipper's read. The module
 *   does not declare itself safe without the GIL: a free-threaded CPython
 *   turns the GIL back on when it is imported.
 * - Store: the recorder's counters and histograms, {metric name: {labels:
 *   series}}, with inc() and observe(); a new series comes from the
 *   recorder's Python (the series cap, under its lock).
 * - HopSampler: Recorder.keeps_hop.
 * - TraceContext: the fields of context.TraceContext, whose methods are
 *   Python (tracer/context.py).
 * - new_trace_id, new_span_id and stamp_outgoing's common case: the ids and
 *   the context every message and outbound request is stamped with.
 *
 * recorder.py and context.py say what these do and why; this file is only
 * how, and each type's doc string names its Python home.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/random.h>

#include "_speedups.h"

/* -- the module's state --------------------------------------------------- */

/* Each interpreter that imports commlens has its own module, and with it its
 * own types and what context.py binds (multi-phase init, PEP 489): a
 * mod_wsgi sub-interpreter's bind_stamping never reaches another
 * interpreter's stamp_outgoing. */
typedef struct {
    PyTypeObject *counter_type;
    PyTypeObject *histogram_type;
    PyTypeObject *store_type;
    PyTypeObject *sampler_type;
    PyTypeObject *trace_context_type;
    PyObject *str_traceparent;
    PyObject *str_baggage;
    /* What context.py binds (bind_stamping), NULL until then. */
    PyObject *current;        /* ContextVar: the hop being served */
    PyObject *otel_context;   /* ContextVar of OpenTelemetry's context, or NULL */
    PyTypeObject *trace_context;  /* context.TraceContext */
    PyObject *in_python;      /* the general case: context._stamp_outgoing_in_python */
} SpeedupsState;

/* -- Counter -------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *value;  /* an int, or a float once a float was added */
} Counter;

static int
no_keywords(const char *name, PyObject *kwargs)
{
    if (kwargs == NULL || PyDict_GET_SIZE(kwargs) == 0)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s() takes no keyword arguments", name);
    return 0;
}

/* The count starts at 0 in tp_new, not only in __init__: a Counter made
 * with Counter.__new__ alone is read and added to like any other. */
static PyObject *
counter_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    Counter *self = (Counter *)type->tp_alloc(type, 0);
    if (self != NULL && (self->value = PyLong_FromLong(0)) == NULL)
        Py_CLEAR(self);
    return (PyObject *)self;
}

static int
counter_init(Counter *self, PyObject *args, PyObject *kwargs)
{
    if (!no_keywords("Counter", kwargs) || !PyArg_ParseTuple(args, ":Counter"))
        return -1;
    Py_XSETREF(self->value, PyLong_FromLong(0));
    return self->value == NULL ? -1 : 0;
}

/* The types are heap types (PyType_FromModuleAndSpec), one set per
 * interpreter: an instance holds its type, which holds the module and its
 * state, so a dealloc releases the type after the instance. */
static void
counter_dealloc(Counter *self)
{
    PyTypeObject *type = Py_TYPE(self);
    Py_XDECREF(self->value);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* The amount of inc(): 1 if not given; NULL (an error set) if not an int
 * or a float, whose __add__ could run Python code between a read and a
 * write. Borrowed; NULL without an error for 1. */
static PyObject *
counter_amount(PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "inc() takes at most one amount");
        return NULL;
    }
    if (nargs == 0)
        return NULL;
    if (!PyLong_CheckExact(args[0]) && !PyFloat_CheckExact(args[0])) {
        PyErr_Format(PyExc_TypeError, "a counter adds an int or a float, not %.100s",
                     Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    return args[0];
}

/* ``amount`` NULL: 1, a small int (no module-level object: those are per
 * interpreter). */
static PyObject *
counter_add(Counter *self, PyObject *amount)
{
    PyObject *sum;
    if (amount != NULL) {
        sum = PyNumber_Add(self->value, amount);
    } else {
        PyObject *one = PyLong_FromLong(1);
        sum = one == NULL ? NULL : PyNumber_Add(self->value, one);
        Py_XDECREF(one);
    }
    if (sum == NULL)
        return NULL;
    Py_SETREF(self->value, sum);
    Py_RETURN_NONE;
}

static PyObject *
counter_get_value(Counter *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->value);
}

static PyObject *
counter_inc(Counter *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *amount = counter_amount(args, nargs);
    return amount == NULL && PyErr_Occurred() ? NULL : counter_add(self, amount);
}

static PyMethodDef counter_methods[] = {
    {"inc", (PyCFunction)(void (*)(void))counter_inc, METH_FASTCALL,
     "inc(amount=1): add to the count."},
    {NULL},
};

static PyGetSetDef counter_getset[] = {
    {"value", (getter)counter_get_value, NULL, "The count so far.", NULL},
    {NULL},
};

static PyType_Slot counter_slots[] = {
    {Py_tp_doc, (void *)"Counter(): a count that only grows."},
    {Py_tp_new, counter_new},
    {Py_tp_init, counter_init},
    {Py_tp_dealloc, counter_dealloc},
    {Py_tp_methods, counter_methods},
    {Py_tp_getset, counter_getset},
    {0, NULL},
};

static PyType_Spec counter_spec = {
    .name = "commlens.tracer._speedups.Counter",
    .basicsize = sizeof(Counter),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = counter_slots,
};

/* -- Histogram ------------------------------------------------------------ */

typedef struct {
    PyObject_VAR_HEAD  /* ob_size: the number of buckets, the last one +Inf */
    double sum;
    /* The smallest and largest value observed (+inf and -inf before the
     * first): the collector clamps its percentile estimates to them. */
    double min, max;
    /* The counts, then the upper bounds as doubles: an update reads and
     * writes one object, not the bounds' float objects scattered in memory. */
    unsigned long long counts[1];
} Histogram;

static inline double *
histogram_bounds(Histogram *self)
{
    return (double *)(self->counts + Py_SIZE(self));
}

static PyObject *
histogram_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *bounds;
    if (!no_keywords("Histogram", kwargs)
            || !PyArg_ParseTuple(args, "O!:Histogram", &PyTuple_Type, &bounds))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(bounds);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *bound = PyTuple_GET_ITEM(bounds, i);
        if (!PyFloat_CheckExact(bound)
                || (i > 0 && PyFloat_AS_DOUBLE(bound)
                             <= PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(bounds, i - 1)))) {
            PyErr_SetString(PyExc_ValueError,
                            "Histogram bounds: a tuple of increasing floats");
            return NULL;
        }
    }
    Histogram *self = (Histogram *)type->tp_alloc(type, 2 * n + 1);
    if (self == NULL)
        return NULL;
    Py_SET_SIZE(self, n + 1);
    self->sum = 0.0;
    self->min = Py_HUGE_VAL;
    self->max = -Py_HUGE_VAL;
    memset(self->counts, 0, sizeof(self->counts[0]) * (size_t)(n + 1));
    for (Py_ssize_t i = 0; i < n; i++)
        histogram_bounds(self)[i] = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(bounds, i));
    return (PyObject *)self;
}

static void
histogram_dealloc(Histogram *self)
{
    PyTypeObject *type = Py_TYPE(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* The value of observe(): a float or an int, as a double; -1.0 with an
 * error set if it is neither (a str is not a duration, even if float()
 * would take it). */
static double
histogram_value(PyObject *arg)
{
    if (PyFloat_CheckExact(arg))
        return PyFloat_AS_DOUBLE(arg);
    if (!PyLong_CheckExact(arg)) {
        PyErr_Format(PyExc_TypeError, "a histogram observes a float or an int, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return -1.0;
    }
    return PyLong_AsDouble(arg);
}

static PyObject *
histogram_add(Histogram *self, double value)
{
    /* bisect_left: the first bucket whose upper bound is >= value (a value
     * on a bound is in that bucket, Prometheus's "le"). */
    Py_ssize_t low = 0, high = Py_SIZE(self) - 1;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (histogram_bounds(self)[middle] < value)
            low = middle + 1;
        else
            high = middle;
    }
    self->counts[low]++;
    self->sum += value;
    /* A NaN compares false both ways and changes neither. */
    if (value < self->min)
        self->min = value;
    if (value > self->max)
        self->max = value;
    Py_RETURN_NONE;
}

static PyObject *
histogram_observe(Histogram *self, PyObject *arg)
{
    double value = histogram_value(arg);
    if (value == -1.0 && PyErr_Occurred())
        return NULL;
    return histogram_add(self, value);
}

static PyObject *
histogram_read(Histogram *self, PyObject *Py_UNUSED(unused))
{
    /* Copied before anything is allocated: an allocation may run the
     * garbage collector, and a finaliser could let another thread update. */
    Py_ssize_t n = Py_SIZE(self);
    unsigned long long *copy = PyMem_Malloc(sizeof(self->counts[0]) * (size_t)n);
    if (copy == NULL)
        return PyErr_NoMemory();
    memcpy(copy, self->counts, sizeof(self->counts[0]) * (size_t)n);
    double sum = self->sum, min = self->min, max = self->max;
    PyObject *counts = PyList_New(n);
    for (Py_ssize_t i = 0; counts != NULL && i < n; i++) {
        PyObject *count = PyLong_FromUnsignedLongLong(copy[i]);
        if (count == NULL)
            Py_CLEAR(counts);
        else
            PyList_SET_ITEM(counts, i, count);
    }
    PyMem_Free(copy);
    if (counts == NULL)
        return NULL;
    /* None for both until a value was observed. */
    if (min > max)
        return Py_BuildValue("[NdOO]", counts, sum, Py_None, Py_None);
    return Py_BuildValue("[Nddd]", counts, sum, min, max);
}

static PyMethodDef histogram_methods[] = {
    {"observe", (PyCFunction)histogram_observe, METH_O,
     "observe(value): count a value in its bucket and add it to the sum."},
    {"read", (PyCFunction)histogram_read, METH_NOARGS,
     "read() -> [counts per bucket, the last one +Inf; sum; smallest and largest "
     "value observed, None before any], as of one instant."},
    {NULL},
};

static PyType_Slot histogram_slots[] = {
    {Py_tp_doc, (void *)"Histogram(bounds): counts per bucket (the upper bounds, then +Inf), "
                        "a sum, the smallest and the largest value."},
    {Py_tp_new, histogram_new},
    {Py_tp_dealloc, histogram_dealloc},
    {Py_tp_methods, histogram_methods},
    {0, NULL},
};

static PyType_Spec histogram_spec = {
    .name = "commlens.tracer._speedups.Histogram",
    .basicsize = offsetof(Histogram, counts),
    .itemsize = sizeof(unsigned long long),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = histogram_slots,
};

/* -- Store ---------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *counters;        /* {metric name: {labels: Counter}} */
    PyObject *histograms;      /* {metric name: {labels: Histogram}} */
    PyObject *new_counter;     /* (metric name, labels) -> the Counter, stored */
    PyObject *new_histogram;   /* (metric name, labels) -> the Histogram, stored */
    PyObject *on_first_use;    /* called once before the next update, or NULL */
    PyTypeObject *counter_type;    /* this interpreter's Counter, what new_counter makes */
    PyTypeObject *histogram_type;  /* and Histogram */
    PyObject *one;                 /* inc()'s amount when none is given */
} Store;

static PyObject *
store_reset(Store *self, PyObject *Py_UNUSED(unused))
{
    PyObject *counters = PyDict_New(), *histograms = PyDict_New();
    if (counters == NULL || histograms == NULL) {
        Py_XDECREF(counters);
        Py_XDECREF(histograms);
        return NULL;
    }
    Py_XSETREF(self->counters, counters);
    Py_XSETREF(self->histograms, histograms);
    Py_RETURN_NONE;
}

static int
store_init(Store *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"new_counter", "new_histogram", NULL};
    PyObject *new_counter, *new_histogram;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:Store", keywords,
                                     &new_counter, &new_histogram))
        return -1;
    SpeedupsState *state = PyType_GetModuleState(Py_TYPE(self));
    if (state == NULL)
        return -1;
    PyObject *done = store_reset(self, NULL);
    if (done == NULL)
        return -1;
    Py_DECREF(done);
    Py_XSETREF(self->counter_type, (PyTypeObject *)Py_NewRef(state->counter_type));
    Py_XSETREF(self->histogram_type, (PyTypeObject *)Py_NewRef(state->histogram_type));
    Py_XSETREF(self->one, PyLong_FromLong(1));
    if (self->one == NULL)
        return -1;
    Py_XSETREF(self->new_counter, Py_NewRef(new_counter));
    Py_XSETREF(self->new_histogram, Py_NewRef(new_histogram));
    return 0;
}

static int
store_traverse(Store *self, visitproc visit, void *arg)
{
    Py_VISIT(self->counters);
    Py_VISIT(self->histograms);
    Py_VISIT(self->new_counter);
    Py_VISIT(self->new_histogram);
    Py_VISIT(self->on_first_use);
    Py_VISIT(self->counter_type);
    Py_VISIT(self->histogram_type);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
store_clear(Store *self)
{
    Py_CLEAR(self->counters);
    Py_CLEAR(self->histograms);
    Py_CLEAR(self->new_counter);
    Py_CLEAR(self->new_histogram);
    Py_CLEAR(self->on_first_use);
    Py_CLEAR(self->counter_type);
    Py_CLEAR(self->histogram_type);
    Py_CLEAR(self->one);
    return 0;
}

static void
store_dealloc(Store *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    store_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* The series of (metric, labels) in ``store``: a new reference, made by
 * ``make`` if it is new. The look-ups hold their own references: labels'
 * __eq__ is Python and may change the dicts under them. */
static PyObject *
store_series(Store *self, int histogram, PyObject *metric, PyObject *labels)
{
    if (self->on_first_use != NULL) {
        PyObject *callback = self->on_first_use;
        self->on_first_use = NULL;
        PyObject *result = PyObject_CallNoArgs(callback);
        Py_DECREF(callback);
        if (result == NULL)
            return NULL;
        Py_DECREF(result);
    }
    /* Read after the callback, which may have reset the store. */
    PyObject *store = histogram ? self->histograms : self->counters;
    PyObject *make = histogram ? self->new_histogram : self->new_counter;
    PyTypeObject *type = histogram ? self->histogram_type : self->counter_type;
    if (store == NULL || make == NULL || type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Store not initialised");
        return NULL;
    }
    Py_INCREF(store);
    Py_INCREF(make);
    /* A Metric, or its name from a compiled caller that has it at hand. */
    PyObject *name = PyUnicode_CheckExact(metric) ? Py_NewRef(metric)
                                                  : PyObject_GetAttrString(metric, "name");
    if (name == NULL) {
        Py_DECREF(store);
        Py_DECREF(make);
        return NULL;
    }
    PyObject *series = Py_XNewRef(PyDict_GetItemWithError(store, name));
    PyObject *entry = NULL;
    if (series != NULL && PyDict_CheckExact(series))
        entry = Py_XNewRef(PyDict_GetItemWithError(series, labels));
    Py_XDECREF(series);
    if (entry == NULL && !PyErr_Occurred())
        entry = PyObject_CallFunctionObjArgs(make, name, labels, NULL);
    Py_DECREF(name);
    Py_DECREF(store);
    Py_DECREF(make);
    if (entry == NULL)
        return NULL;
    if (Py_TYPE(entry) != type) {
        PyErr_Format(PyExc_TypeError, "a %.100s where a %.100s series belongs",
                     Py_TYPE(entry)->tp_name, type->tp_name);
        Py_DECREF(entry);
        return NULL;
    }
    return entry;
}

static PyObject *
store_inc(Store *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "inc(metric, labels, amount=1)");
        return NULL;
    }
    PyObject *amount = self->one;  /* NULL only before __init__: no series then */
    if (nargs > 2 && (amount = counter_amount(args + 2, nargs - 2)) == NULL)
        return NULL;  /* checked first: bad input makes no series */
    PyObject *counter = store_series(self, 0, args[0], args[1]);
    if (counter == NULL)
        return NULL;
    PyObject *result = counter_add((Counter *)counter, amount);
    Py_DECREF(counter);
    return result;
}

static PyObject *
store_observe(Store *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "observe(metric, labels, seconds)");
        return NULL;
    }
    double value = histogram_value(args[2]);
    if (value == -1.0 && PyErr_Occurred())
        return NULL;  /* checked first: bad input makes no series */
    PyObject *histogram = store_series(self, 1, args[0], args[1]);
    if (histogram == NULL)
        return NULL;
    PyObject *result = histogram_add((Histogram *)histogram, value);
    Py_DECREF(histogram);
    return result;
}

static PyMethodDef store_methods[] = {
    {"inc", (PyCFunction)(void (*)(void))store_inc, METH_FASTCALL,
     "inc(metric, labels, amount=1): add to a counter."},
    {"observe", (PyCFunction)(void (*)(void))store_observe, METH_FASTCALL,
     "observe(metric, labels, seconds): count a duration in a histogram."},
    {"reset", (PyCFunction)store_reset, METH_NOARGS,
     "Start again from no series (after fork); the store itself stays."},
    {NULL},
};

static PyObject *
store_get_on_first_use(Store *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->on_first_use != NULL ? self->on_first_use : Py_None);
}

/* A callable, or None (or del) for none: the next update calls it. */
static int
store_set_on_first_use(Store *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value != NULL && value != Py_None && !PyCallable_Check(value)) {
        PyErr_Format(PyExc_TypeError, "on_first_use: a callable or None, not %.100s",
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    Py_XSETREF(self->on_first_use, value == Py_None ? NULL : Py_XNewRef(value));
    return 0;
}

static PyGetSetDef store_getset[] = {
    COMMLENS_READONLY_FIELD("counters", Store, counters),
    COMMLENS_READONLY_FIELD("histograms", Store, histograms),
    {"on_first_use", (getter)store_get_on_first_use, (setter)store_set_on_first_use,
     "Called once, before the next update (the recorder's shipper after fork).", NULL},
    {NULL},
};

static PyType_Slot store_slots[] = {
    {Py_tp_doc, (void *)"Store(new_counter, new_histogram): a recorder's counters and "
                        "histograms (tracer/recorder.py)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, store_init},
    {Py_tp_dealloc, store_dealloc},
    {Py_tp_traverse, store_traverse},
    {Py_tp_clear, store_clear},
    {Py_tp_methods, store_methods},
    {Py_tp_getset, store_getset},
    {0, NULL},
};

static PyType_Spec store_spec = {
    .name = "commlens.tracer._speedups.Store",
    .basicsize = sizeof(Store),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = store_slots,
};

/* -- ids ------------------------------------------------------------------ */

/* Trace and span ids are random bits (W3C: random, not all zero; they need
 * not be unpredictable). xoshiro256** seeded from the OS, again in every
 * forked child so that workers never repeat their master's ids. Its state
 * is changed only with the GIL held. */
static uint64_t prng_state[4];

static void
seed_ids(void)
{
    uint64_t seed[4] = {0, 0, 0, 0};
    if (getrandom(seed, sizeof(seed), 0) != (ssize_t)sizeof(seed)) {
        /* No entropy call: time and pid still differ between processes. */
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        seed[0] ^= (uint64_t)now.tv_nsec * 0x9e3779b97f4a7c15ULL;
        seed[1] ^= (uint64_t)now.tv_sec;
        seed[2] ^= (uint64_t)getpid() * 0xbf58476d1ce4e5b9ULL;
    }
    if (!(seed[0] | seed[1] | seed[2] | seed[3]))
        seed[3] = 1;  /* the one state xoshiro cannot leave */
    memcpy(prng_state, seed, sizeof(seed));
}

static inline uint64_t
rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t
next_random(void)
{
    uint64_t *s = prng_state;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* ``words`` * 16 lowercase hex digits, never all zero. */
static PyObject *
random_hex(int words)
{
    static const char digits[] = "0123456789abcdef";
    uint64_t value[2];
    do {
        value[0] = next_random();
        value[1] = words == 2 ? next_random() : 0;
    } while (value[0] == 0 && value[1] == 0);
    PyObject *text = PyUnicode_New(16 * words, 127);
    if (text == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    for (int w = 0; w < words; w++)
        for (int i = 15; i >= 0; i--, value[w] >>= 4)
            out[16 * w + i] = (Py_UCS1)digits[value[w] & 15];
    return text;
}

static PyObject *
new_trace_id(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    return random_hex(2);
}

static PyObject *
new_span_id(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    return random_hex(1);
}

/* -- HopSampler ----------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *bound;     /* hops.sample_bound(ratio) */
    double ratio;
    double slow_seconds;
} HopSampler;

static int
sampler_init(HopSampler *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"ratio", "bound", "slow_seconds", NULL};
    PyObject *bound;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "dUd:HopSampler", keywords,
                                     &self->ratio, &bound, &self->slow_seconds))
        return -1;
    Py_XSETREF(self->bound, Py_NewRef(bound));
    return 0;
}

static void
sampler_dealloc(HopSampler *self)
{
    PyTypeObject *type = Py_TYPE(self);
    Py_XDECREF(self->bound);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *
sampler_keeps(HopSampler *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "keeps_hop(trace_id, duration, failed)");
        return NULL;
    }
    if (self->bound == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HopSampler not initialised");
        return NULL;
    }
    PyObject *trace_id = args[0];
    double duration = PyFloat_AsDouble(args[1]);
    if (duration == -1.0 && PyErr_Occurred())
        return NULL;
    int failed = PyObject_IsTrue(args[2]);
    if (failed < 0)
        return NULL;
    if (failed || duration >= self->slow_seconds)
        Py_RETURN_TRUE;
    if (trace_id == Py_None) {
        /* A uniform draw in [0, 1), from the ids' generator. */
        double draw = (double)(next_random() >> 11) * 0x1.0p-53;
        return PyBool_FromLong(draw < self->ratio);
    }
    if (!PyUnicode_Check(trace_id)) {
        PyErr_SetString(PyExc_TypeError, "a trace id is a str");
        return NULL;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(trace_id);
    PyObject *tail = PyUnicode_Substring(trace_id, length > 8 ? length - 8 : 0, length);
    if (tail == NULL)
        return NULL;
    int below = PyUnicode_Compare(tail, self->bound) < 0;
    Py_DECREF(tail);
    return PyBool_FromLong(below);
}

static PyMethodDef sampler_methods[] = {
    {"keeps_hop", (PyCFunction)(void (*)(void))sampler_keeps, METH_FASTCALL,
     "keeps_hop(trace_id, duration, failed): ship this hop? (Recorder.keeps_hop)"},
    {NULL},
};

static PyType_Slot sampler_slots[] = {
    {Py_tp_doc, (void *)"HopSampler(ratio, bound, slow_seconds): which hops a recorder "
                        "ships (tracer/recorder.py)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, sampler_init},
    {Py_tp_dealloc, sampler_dealloc},
    {Py_tp_methods, sampler_methods},
    {0, NULL},
};

static PyType_Spec sampler_spec = {
    .name = "commlens.tracer._speedups.HopSampler",
    .basicsize = sizeof(HopSampler),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = sampler_slots,
};

/* -- TraceContext --------------------------------------------------------- */

typedef CommlensTraceContext TraceContext;  /* _speedups.h */

/* The compiled paths read these fields as C pointers and format the ids
 * into traceparent headers; a service's code can reach them
 * (context.current()), so no field may be deleted and each takes only what
 * the tracer itself writes: an id is None or lowercase hex of its W3C
 * length, not all zero; a flag is a bool; the service is None or a str.
 * Anything else is the caller's bug, refused at the assignment. */

enum { TRACE_ID_DIGITS = 32, SPAN_ID_DIGITS = 16 };

/* 0 if ``value`` may be an id of ``digits`` hex digits (or None); -1 and
 * an error naming ``field`` if not. */
static int
check_id(PyObject *value, Py_ssize_t digits, const char *field)
{
    if (value == Py_None)
        return 0;
    if (!PyUnicode_CheckExact(value)) {
        PyErr_Format(PyExc_TypeError, "TraceContext.%s: a str or None, not %.100s", field,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    int all_zero = 1;
    int valid = PyUnicode_IS_ASCII(value) && PyUnicode_GET_LENGTH(value) == digits;
    const Py_UCS1 *text = valid ? PyUnicode_1BYTE_DATA(value) : NULL;
    for (Py_ssize_t i = 0; valid && i < digits; i++) {
        valid = (text[i] >= '0' && text[i] <= '9') || (text[i] >= 'a' && text[i] <= 'f');
        all_zero &= text[i] == '0';
    }
    if (!valid || all_zero) {
        PyErr_Format(PyExc_ValueError,
                     "TraceContext.%s: %zd lowercase hex digits, not all zero", field, digits);
        return -1;
    }
    return 0;
}

static int
check_flag(PyObject *value, const char *field)
{
    if (PyBool_Check(value))
        return 0;
    PyErr_Format(PyExc_TypeError, "TraceContext.%s: a bool, not %.100s", field,
                 Py_TYPE(value)->tp_name);
    return -1;
}

static int
check_service(PyObject *value)
{
    if (value == Py_None || PyUnicode_CheckExact(value))
        return 0;
    PyErr_Format(PyExc_TypeError, "TraceContext.service: a str or None, not %.100s",
                 Py_TYPE(value)->tp_name);
    return -1;
}

enum trace_context_field { TRACE_ID, SPAN_ID, PARENT_ID, SAMPLED, CHILD_FAILED, SERVICE };

static PyObject **
trace_context_slot(TraceContext *self, enum trace_context_field field)
{
    switch (field) {
    case TRACE_ID: return &self->trace_id;
    case SPAN_ID: return &self->span_id;
    case PARENT_ID: return &self->parent_id;
    case SAMPLED: return &self->sampled;
    case CHILD_FAILED: return &self->child_failed;
    case SERVICE: break;
    }
    return &self->service;
}

static const char *const trace_context_names[] = {
    "trace_id", "span_id", "parent_id", "sampled", "child_failed", "service"};

static int
trace_context_check(enum trace_context_field field, PyObject *value)
{
    switch (field) {
    case TRACE_ID: return check_id(value, TRACE_ID_DIGITS, "trace_id");
    case SPAN_ID: return check_id(value, SPAN_ID_DIGITS, "span_id");
    case PARENT_ID: return check_id(value, SPAN_ID_DIGITS, "parent_id");
    case SAMPLED: return check_flag(value, "sampled");
    case CHILD_FAILED: return check_flag(value, "child_failed");
    case SERVICE: break;
    }
    return check_service(value);
}

static PyObject *
trace_context_get(TraceContext *self, void *closure)
{
    return Py_NewRef(*trace_context_slot(self, (enum trace_context_field)(intptr_t)closure));
}

static int
trace_context_set(TraceContext *self, PyObject *value, void *closure)
{
    enum trace_context_field field = (enum trace_context_field)(intptr_t)closure;
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "TraceContext.%s cannot be deleted",
                     trace_context_names[field]);
        return -1;
    }
    if (trace_context_check(field, value) < 0)
        return -1;
    Py_SETREF(*trace_context_slot(self, field), Py_NewRef(value));
    return 0;
}

static PyObject *
trace_context_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    return commlens_trace_context_new(type);
}

static int
trace_context_init(TraceContext *self, PyObject *args, PyObject *kwargs)
{
    if ((args == NULL || PyTuple_GET_SIZE(args) == 0)
            && (kwargs == NULL || PyDict_GET_SIZE(kwargs) == 0))
        return 0;  /* a new hop: what tp_new set */
    static char *keywords[] = {"trace_id", "span_id", "parent_id", "sampled", NULL};
    PyObject *values[] = {Py_None, Py_None, Py_None, Py_True};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OOOO:TraceContext", keywords,
                                     &values[TRACE_ID], &values[SPAN_ID], &values[PARENT_ID],
                                     &values[SAMPLED]))
        return -1;
    /* All checked before any is set: a refused value changes nothing. */
    for (int field = TRACE_ID; field <= SAMPLED; field++)
        if (trace_context_check((enum trace_context_field)field, values[field]) < 0)
            return -1;
    for (int field = TRACE_ID; field <= SAMPLED; field++)
        Py_SETREF(*trace_context_slot(self, (enum trace_context_field)field),
                  Py_NewRef(values[field]));
    return 0;
}

static void
trace_context_dealloc(TraceContext *self)
{
    Py_XDECREF(self->trace_id);
    Py_XDECREF(self->span_id);
    Py_XDECREF(self->parent_id);
    Py_XDECREF(self->sampled);
    Py_XDECREF(self->child_failed);
    Py_XDECREF(self->service);
    /* Instances are of context.TraceContext, a Python subclass, whose
     * subtype_dealloc calls this and leaves the class to it: the base is a
     * heap type. */
    PyTypeObject *type = Py_TYPE(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

#define TRACE_CONTEXT_FIELD(field, doc) \
    {#field, (getter)trace_context_get, (setter)trace_context_set, doc, \
     (void *)(intptr_t)field_##field}

enum {
    field_trace_id = TRACE_ID, field_span_id = SPAN_ID, field_parent_id = PARENT_ID,
    field_sampled = SAMPLED, field_child_failed = CHILD_FAILED, field_service = SERVICE,
};

static PyGetSetDef trace_context_getset[] = {
    TRACE_CONTEXT_FIELD(trace_id, "32 lowercase hex digits, or None until drawn."),
    TRACE_CONTEXT_FIELD(span_id, "16 lowercase hex digits, or None until drawn."),
    TRACE_CONTEXT_FIELD(parent_id, "16 lowercase hex digits, or None."),
    TRACE_CONTEXT_FIELD(sampled, "A bool."),
    TRACE_CONTEXT_FIELD(child_failed, "A bool: a call this hop made failed."),
    TRACE_CONTEXT_FIELD(service, "The service serving this hop (a str), or None."),
    {NULL},
};

static PyType_Slot trace_context_slots[] = {
    {Py_tp_doc, (void *)"The fields of context.TraceContext (tracer/context.py)."},
    {Py_tp_new, trace_context_new},
    {Py_tp_init, trace_context_init},
    {Py_tp_dealloc, trace_context_dealloc},
    {Py_tp_getset, trace_context_getset},
    {0, NULL},
};

static PyType_Spec trace_context_spec = {
    .name = "commlens.tracer._speedups.TraceContext",
    .basicsize = sizeof(TraceContext),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = trace_context_slots,
};

/* -- stamp_outgoing ------------------------------------------------------- */

static PyObject *
bind_stamping(PyObject *module, PyObject *args, PyObject *kwargs)
{
    SpeedupsState *state = PyModule_GetState(module);
    static char *keywords[] = {"current", "otel_context", "trace_context", "in_python",
                               NULL};
    PyObject *current, *otel_context, *trace_context, *in_python;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$O!OO!O:bind_stamping", keywords,
                                     &PyContextVar_Type, &current, &otel_context,
                                     &PyType_Type, &trace_context, &in_python))
        return NULL;
    if (otel_context != Py_None && !PyContextVar_CheckExact(otel_context)) {
        PyErr_SetString(PyExc_TypeError, "otel_context: a ContextVar or None");
        return NULL;
    }
    if (!commlens_is_trace_context_type((PyTypeObject *)trace_context,
                                        state->trace_context_type)) {
        PyErr_SetString(PyExc_TypeError,
                        "trace_context: a subclass of TraceContext with no fields");
        return NULL;
    }
    Py_XSETREF(state->current, Py_NewRef(current));
    Py_XSETREF(state->otel_context, otel_context == Py_None ? NULL : Py_NewRef(otel_context));
    Py_XSETREF(state->trace_context, (PyTypeObject *)Py_NewRef(trace_context));
    Py_XSETREF(state->in_python, Py_NewRef(in_python));
    Py_RETURN_NONE;
}

/* context.TraceContext.ensure_ids: the hop's ids, drawn if not yet. A span
 * id without a trace id is none of ours: both are drawn then, so the hop
 * starts a fresh trace rather than sending a traceparent without one.
 * Nothing changes if a draw fails. 0, or -1 and an error. */
static int
draw_ids(CommlensTraceContext *ctx)
{
    if (ctx->trace_id != Py_None && ctx->span_id != Py_None)
        return 0;
    int fresh_trace = ctx->trace_id == Py_None;
    PyObject *trace_id = fresh_trace ? random_hex(2) : Py_NewRef(ctx->trace_id);
    PyObject *span_id = trace_id == NULL ? NULL : random_hex(1);
    if (span_id == NULL) {
        Py_XDECREF(trace_id);
        return -1;
    }
    Py_SETREF(ctx->trace_id, trace_id);
    Py_SETREF(ctx->span_id, span_id);
    return 0;
}

/* Whether the common case applies: a dict carrier with neither a
 * traceparent (one injected by OpenTelemetry may have to be kept) nor a
 * baggage to keep members of, and no active OpenTelemetry span to join.
 * -1 on error. */
static int
stamp_is_common(SpeedupsState *state, PyObject *carrier, PyObject *service, PyObject *kind,
                PyObject *parent)
{
    if (!PyDict_CheckExact(carrier) || !PyUnicode_CheckExact(service)
            || !PyUnicode_CheckExact(kind))
        return 0;
    PyObject *value = PyDict_GetItemWithError(carrier, state->str_traceparent);
    if (value != NULL || PyErr_Occurred())
        return PyErr_Occurred() ? -1 : 0;
    value = PyDict_GetItemWithError(carrier, state->str_baggage);
    if ((value != NULL && value != Py_None) || PyErr_Occurred())
        return PyErr_Occurred() ? -1 : 0;
    if (parent != Py_None)
        return Py_TYPE(parent) == state->trace_context;
    if (state->otel_context == NULL)
        return 1;
    PyObject *otel;
    if (PyContextVar_Get(state->otel_context, NULL, &otel) < 0)
        return -1;
    if (otel == NULL)
        return 1;
    int active = PyObject_IsTrue(otel);
    Py_DECREF(otel);
    return active < 0 ? -1 : !active;
}

/* The str of ``count`` parts, each ``objects[i]`` (a str) or, where that is
 * NULL, the C text ``texts[i]``: built directly when every str is ASCII (the
 * ids always are), else by PyUnicode_Concat. PyUnicode_FromFormat cost about
 * 1,600 instructions per value here, a tenth of a cast's whole overhead. */
static PyObject *
ascii_join(int count, PyObject *const *objects, const char *const *texts)
{
    Py_ssize_t length = 0;
    int ascii = 1;
    for (int i = 0; i < count; i++) {
        if (objects[i] == NULL)
            length += (Py_ssize_t)strlen(texts[i]);
        else if (PyUnicode_IS_ASCII(objects[i]))
            length += PyUnicode_GET_LENGTH(objects[i]);
        else
            ascii = 0;
    }
    if (!ascii) {
        PyObject *result = PyUnicode_FromString("");
        for (int i = 0; i < count && result != NULL; i++) {
            PyObject *part = objects[i] ? Py_NewRef(objects[i])
                                        : PyUnicode_FromString(texts[i]);
            if (part == NULL) {
                Py_CLEAR(result);
                break;
            }
            Py_SETREF(result, PyUnicode_Concat(result, part));
            Py_DECREF(part);
        }
        return result;
    }
    PyObject *result = PyUnicode_New(length, 127);
    if (result == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(result);
    for (int i = 0; i < count; i++) {
        Py_ssize_t size = objects[i] ? PyUnicode_GET_LENGTH(objects[i])
                                     : (Py_ssize_t)strlen(texts[i]);
        memcpy(out, objects[i] ? (const void *)PyUnicode_1BYTE_DATA(objects[i])
                               : (const void *)texts[i], size);
        out += size;
    }
    return result;
}

static PyObject *
stamp_outgoing(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    SpeedupsState *state = PyModule_GetState(module);
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "stamp_outgoing(carrier, service, kind)");
        return NULL;
    }
    if (state->in_python == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "stamp_outgoing: not bound");
        return NULL;
    }
    PyObject *carrier = args[0], *service = args[1], *kind = args[2];
    PyObject *parent;
    if (PyContextVar_Get(state->current, Py_None, &parent) < 0)
        return NULL;
    int common = stamp_is_common(state, carrier, service, kind, parent);
    if (common <= 0) {
        Py_DECREF(parent);
        return common < 0 ? NULL : PyObject_Vectorcall(state->in_python, args, 3, NULL);
    }
    PyObject *trace_id, *parent_id = Py_None, *sampled = Py_True;
    if (parent == Py_None) {
        /* The first hop of a new trace. */
        trace_id = random_hex(2);
    } else {
        /* A child of the hop being served, whose own ids are drawn now if
         * they were not yet (context.TraceContext.ensure_ids). */
        CommlensTraceContext *served = (CommlensTraceContext *)parent;
        if (draw_ids(served) < 0) {
            Py_DECREF(parent);
            return NULL;
        }
        trace_id = Py_NewRef(served->trace_id);
        parent_id = served->span_id;
        sampled = served->sampled;
    }
    /* Fields set only to what the setters would take (never NULL): a
     * context may outlive this call as the hop of the send. */
    CommlensTraceContext *ctx = trace_id == NULL ? NULL
        : (CommlensTraceContext *)commlens_trace_context_new(state->trace_context);
    PyObject *span_id = ctx == NULL ? NULL : random_hex(1);
    if (span_id == NULL) {
        Py_XDECREF(trace_id);
        Py_XDECREF(ctx);
        Py_DECREF(parent);
        return NULL;
    }
    Py_SETREF(ctx->trace_id, trace_id);
    Py_SETREF(ctx->span_id, span_id);
    Py_SETREF(ctx->parent_id, Py_NewRef(parent_id));
    Py_SETREF(ctx->sampled, Py_NewRef(sampled));
    Py_DECREF(parent);
    /* The fields are checked str and bool (TraceContext's setters), so
     * formatting them runs no Python code. */
    PyObject *traceparent = ascii_join(5, (PyObject *[]){
        NULL, ctx->trace_id, NULL, ctx->span_id, NULL},
        (const char *[]){"00-", NULL, "-", NULL, ctx->sampled == Py_True ? "-01" : "-00"});
    /* context.with_baggage_sender's member, alone */
    PyObject *baggage = traceparent == NULL ? NULL : ascii_join(6, (PyObject *[]){
        NULL, service, NULL, kind, NULL, ctx->span_id},
        (const char *[]){"commlens.service=", NULL, ";kind=", NULL, ";span=", NULL});
    if (baggage == NULL
            || PyDict_SetItem(carrier, state->str_traceparent, traceparent) < 0
            || PyDict_SetItem(carrier, state->str_baggage, baggage) < 0) {
        Py_XDECREF(traceparent);
        Py_XDECREF(baggage);
        Py_DECREF(ctx);
        return NULL;
    }
    Py_DECREF(traceparent);
    Py_DECREF(baggage);
    return (PyObject *)ctx;
}

static PyMethodDef module_methods[] = {
    {"new_trace_id", new_trace_id, METH_NOARGS, "32 random lowercase hex digits, not all 0."},
    {"new_span_id", new_span_id, METH_NOARGS, "16 random lowercase hex digits, not all 0."},
    {"stamp_outgoing", (PyCFunction)(void (*)(void))stamp_outgoing, METH_FASTCALL,
     "context.stamp_outgoing (see there); the general case calls back into Python."},
    {"bind_stamping", (PyCFunction)(void (*)(void))bind_stamping,
     METH_VARARGS | METH_KEYWORDS, "Give stamp_outgoing what it reads (context.py, once)."},
    {NULL},
};

/* -- module --------------------------------------------------------------- */

/* The ids' generator is one per process (seeded here once, again in every
 * forked child), not one per interpreter: interpreters importing this share
 * one GIL (_speedups.h, COMMLENS_SLOT_INTERPRETERS). */
static int ids_seeded;

static int
speedups_exec(PyObject *module)
{
    SpeedupsState *state = PyModule_GetState(module);
    if (!ids_seeded) {
        seed_ids();
        if (pthread_atfork(NULL, NULL, seed_ids) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return -1;
        }
        ids_seeded = 1;
    }
    if ((state->str_traceparent = PyUnicode_InternFromString("traceparent")) == NULL
            || (state->str_baggage = PyUnicode_InternFromString("baggage")) == NULL)
        return -1;
    struct { PyType_Spec *spec; PyTypeObject **type; } types[] = {
        {&counter_spec, &state->counter_type},
        {&histogram_spec, &state->histogram_type},
        {&store_spec, &state->store_type},
        {&sampler_spec, &state->sampler_type},
        {&trace_context_spec, &state->trace_context_type},
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        *types[i].type = (PyTypeObject *)PyType_FromModuleAndSpec(module, types[i].spec, NULL);
        if (*types[i].type == NULL || PyModule_AddType(module, *types[i].type) < 0)
            return -1;
    }
    return 0;
}

#define SPEEDUPS_STATE_FIELDS(X) \
    X(counter_type) X(histogram_type) X(store_type) X(sampler_type) \
    X(trace_context_type) X(str_traceparent) X(str_baggage) X(current) X(otel_context) \
    X(trace_context) X(in_python)

static int
speedups_traverse(PyObject *module, visitproc visit, void *arg)
{
    SpeedupsState *state = PyModule_GetState(module);
#define VISIT(field) Py_VISIT(state->field);
    SPEEDUPS_STATE_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
speedups_clear(PyObject *module)
{
    SpeedupsState *state = PyModule_GetState(module);
#define CLEAR(field) Py_CLEAR(state->field);
    SPEEDUPS_STATE_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
speedups_free(void *module)
{
    speedups_clear((PyObject *)module);
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, speedups_exec},
    COMMLENS_SLOT_INTERPRETERS
    COMMLENS_SLOT_GIL
    {0, NULL},
};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_speedups",
    .m_doc = "The tracer's per-hop types, compiled (see tracer/_speedups.c).",
    .m_size = sizeof(SpeedupsState),
    .m_methods = module_methods,
    .m_slots = speedups_slots,
    .m_traverse = speedups_traverse,
    .m_clear = speedups_clear,
    .m_free = speedups_free,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module_def);
}
