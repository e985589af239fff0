/* The estimate's event stream, compiled: memfit.estimator.events.Stream as a C type that keeps its operations
   in flat arrays of 64-bit integers instead of one Python tuple per operation.

   A stream of a large model holds tens of thousands of operations. As tuples each one cost an allocation (and
   the cyclic collector's visits), the copy of a layer's stretch one new tuple per operation, and every replay
   one Python integer conversion per field. Here an operation is four int64s:

       (0, handle, bytes, component id)   an allocation
       (1, handle, bytes, component id)   a free (the bytes and component of the tensor it frees)
       (2, name id, 0, 0)                 a phase mark
       (3, 0, 0, 0)                       torch.cuda.reset_peak_memory_stats

   with each handle's bytes and component id beside them, and one table of the component and phase names.
   Methods and results are those of events.PyStream (the Python version, used where this is not built or
   MEMFIT_PURE_PYTHON is set): alloc, free, alloc_all, free_all, regrow, mark, repeat, repeat_map, again, phase,
   reset_peaks,
   account, op, phase_at, and `ops` (the operations as PyStream's tuples, made when asked for). The allocator
   replay (allocator/_replay.c) reads the operations through the buffer protocol (format "q", four per
   operation) without converting anything.

   Sizes are whole bytes below 2**62 (a float rounds half to even, as int(round(x))); a larger one raises
   OverflowError, and the estimator then builds the stream with PyStream (exact integers).

   tests/test_stream_repeat.py builds every registry model's streams with both and compares them op for op;
   tests/test_fast_replay_account.py compares the account with the event-by-event walk. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define OP_ALLOC 0
#define OP_FREE 1
#define OP_PHASE 2
#define OP_RESET 3
#define MAX_BYTES (1LL << 62)

typedef struct {
    PyObject_HEAD
    int64_t *ops; /* 4 per operation */
    Py_ssize_t nops, capops;
    int64_t *hsize; /* by handle */
    int32_t *hcomp;
    Py_ssize_t nh, caph;
    Py_ssize_t *marks, nmarks, capmarks; /* operation index of each phase mark */
    Py_ssize_t *resets, nresets, capresets;
    PyObject *names;    /* list: id -> str (components and phase names) */
    PyObject *ids;      /* dict: str -> id */
    PyObject *last_str; /* the last name looked up (borrowed through names), and its id */
    int32_t last_id;
    PyObject *accounted;
    PyObject *phase_name;
    PyObject *ops_cache; /* the tuples, once made (dropped when an operation is added) */
    Py_ssize_t exports;
} StreamObject;

/* Large arrays of streams that are gone (and the walks' scratch arrays), kept for the next ones: an estimate
   builds a stream of tens of thousands of operations, replays it and drops it, and each fresh array of some
   hundred KiB came from the system and faulted its pages in again (a sixth of a large model's stream build).
   At most KEEP_BLOCKS blocks and KEEP_BYTES in all, the largest kept; called with the GIL held, like every
   function here. */
#define KEEP_BLOCKS 8
#define KEEP_MIN ((size_t)32 << 10)
#define KEEP_BYTES ((size_t)64 << 20)
static struct {
    void *p;
    size_t cap;
} kept[KEEP_BLOCKS];
static int nkept;
static size_t kept_bytes;

/* a block of at least `need` bytes (*cap: its size): a kept one where one is large enough (`largest`: the
   largest kept, for an array that grows; else the smallest that holds `need`), else a new one; NULL: no memory */
static void *keep_take(size_t need, size_t *cap, int largest) {
    int best = -1;
    for (int i = 0; i < nkept; i++)
        if (kept[i].cap >= need &&
            (best < 0 || (largest ? kept[i].cap > kept[best].cap : kept[i].cap < kept[best].cap)))
            best = i;
    if (best < 0) {
        *cap = need ? need : 1;
        return PyMem_Malloc(*cap);
    }
    void *p = kept[best].p;
    *cap = kept[best].cap;
    kept_bytes -= *cap;
    kept[best] = kept[--nkept];
    return p;
}

/* block p of cap bytes back: kept (in place of a smaller one where all places are taken), else freed */
static void keep_give(void *p, size_t cap) {
    if (!p) return;
    if (cap < KEEP_MIN || cap > KEEP_BYTES) {
        PyMem_Free(p);
        return;
    }
    while (nkept == KEEP_BLOCKS || kept_bytes + cap > KEEP_BYTES) {
        int small = 0;
        for (int i = 1; i < nkept; i++)
            if (kept[i].cap < kept[small].cap) small = i;
        if (!nkept || kept[small].cap >= cap) {
            PyMem_Free(p);
            return;
        }
        PyMem_Free(kept[small].p);
        kept_bytes -= kept[small].cap;
        kept[small] = kept[--nkept];
    }
    kept[nkept].p = p;
    kept[nkept].cap = cap;
    nkept++;
    kept_bytes += cap;
}

static int grow_array(StreamObject *s, void **a, Py_ssize_t *cap, Py_ssize_t need, size_t elem) {
    if (need <= *cap) return 0;
    if (s->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "the stream's operations are being read (a replay holds its buffer)");
        return -1;
    }
    Py_ssize_t n = *cap ? *cap : 256;
    while (n < need) n *= 2;
    if (!*a) { /* a new stream's array: the largest kept one, if it holds this much */
        size_t got;
        void *k = keep_take((size_t)n * elem, &got, 1);
        if (!k) {
            PyErr_NoMemory();
            return -1;
        }
        *a = k;
        *cap = (Py_ssize_t)(got / elem);
        return 0;
    }
    void *b = PyMem_Realloc(*a, (size_t)n * elem);
    if (!b) {
        PyErr_NoMemory();
        return -1;
    }
    *a = b;
    *cap = n;
    return 0;
}

static inline int room_ops(StreamObject *s, Py_ssize_t more) {
    if (s->nops + more <= s->capops) return 0;
    Py_ssize_t cap4 = s->capops * 4;
    if (grow_array(s, (void **)&s->ops, &cap4, (s->nops + more) * 4, sizeof(int64_t)) < 0) return -1;
    s->capops = cap4 / 4;
    return 0;
}

static inline int room_handles(StreamObject *s, Py_ssize_t more) {
    if (s->nh + more <= s->caph) return 0;
    Py_ssize_t c1 = s->caph, c2 = s->caph;
    if (grow_array(s, (void **)&s->hsize, &c1, s->nh + more, sizeof(int64_t)) < 0) return -1;
    if (grow_array(s, (void **)&s->hcomp, &c2, s->nh + more, sizeof(int32_t)) < 0) return -1;
    s->caph = c1 < c2 ? c1 : c2;
    return 0;
}

static inline void put_op(StreamObject *s, int64_t k, int64_t a, int64_t b, int64_t c) {
    int64_t *o = s->ops + 4 * s->nops++;
    o[0] = k;
    o[1] = a;
    o[2] = b;
    o[3] = c;
}

static inline void touched(StreamObject *s) {
    if (s->ops_cache) Py_CLEAR(s->ops_cache);
}

/* the id of name (a str) in the names table, added when new; -1 on error */
static int32_t name_id(StreamObject *s, PyObject *name) {
    if (name == s->last_str) return s->last_id;
    if (!PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "a component or phase name must be a str");
        return -1;
    }
    PyObject *v = PyDict_GetItemWithError(s->ids, name);
    int32_t id;
    if (v) {
        id = (int32_t)PyLong_AsLong(v);
    } else {
        if (PyErr_Occurred()) return -1;
        Py_ssize_t n = PyList_GET_SIZE(s->names);
        if (n >= INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "too many names");
            return -1;
        }
        PyObject *k = PyLong_FromSsize_t(n);
        if (!k) return -1;
        int bad = PyDict_SetItem(s->ids, name, k) < 0 || PyList_Append(s->names, name) < 0;
        Py_DECREF(k);
        if (bad) return -1;
        id = (int32_t)n;
    }
    s->last_str = PyList_GET_ITEM(s->names, id);
    s->last_id = id;
    return id;
}

/* int(round(x)) as whole bytes: 0 and *out set (<= 0: no tensor), -1 on error (OverflowError at 2**62 or
   more: the caller builds the stream in Python) */
static int to_bytes(PyObject *x, int64_t *out) {
    if (PyFloat_CheckExact(x)) {
        double d = PyFloat_AS_DOUBLE(x);
        if (isnan(d)) {
            PyErr_SetString(PyExc_ValueError, "cannot convert float NaN to integer");
            return -1;
        }
        if (isinf(d)) {
            PyErr_SetString(PyExc_OverflowError, "cannot convert float infinity to integer");
            return -1;
        }
        if (d <= 0.5) { /* round half to even: 0.5 -> 0 */
            *out = 0;
            return 0;
        }
        if (d < 9007199254740992.0) {
            *out = (int64_t)nearbyint(d); /* the default rounding mode: half to even, as float.__round__ */
            return 0;
        }
        if (d < (double)MAX_BYTES) {
            *out = (int64_t)d; /* integral already */
            return 0;
        }
        PyErr_SetString(PyExc_OverflowError, "a tensor of 2**62 bytes or more");
        return -1;
    }
    PyObject *n;
    if (PyLong_Check(x)) {
        n = x;
        Py_INCREF(n);
    } else {
        PyObject *r = PyObject_CallMethod(x, "__round__", NULL);
        if (!r) return -1;
        n = PyNumber_Long(r);
        Py_DECREF(r);
        if (!n) return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(n, &overflow);
    Py_DECREF(n);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow < 0 || (!overflow && v <= 0)) {
        *out = 0;
        return 0;
    }
    if (overflow > 0 || v >= MAX_BYTES) {
        PyErr_SetString(PyExc_OverflowError, "a tensor of 2**62 bytes or more");
        return -1;
    }
    *out = v;
    return 0;
}

/* one allocation of n bytes (> 0) of component id c; its handle */
static int64_t add_alloc(StreamObject *s, int64_t n, int32_t c) {
    if (room_ops(s, 1) < 0 || room_handles(s, 1) < 0) return -1;
    int64_t h = s->nh++;
    s->hsize[h] = n;
    s->hcomp[h] = c;
    put_op(s, OP_ALLOC, h, n, c);
    return h;
}

static int add_free(StreamObject *s, int64_t h) {
    if (h < 0) return 0;
    if (h >= s->nh) {
        PyErr_SetString(PyExc_IndexError, "free of a handle the stream never made");
        return -1;
    }
    if (room_ops(s, 1) < 0) return -1;
    put_op(s, OP_FREE, h, s->hsize[h], s->hcomp[h]);
    return 0;
}

/* alloc of x (a number) as component c; the handle, -1 for none, -2 on error */
static int64_t alloc_obj(StreamObject *s, PyObject *x, int32_t c) {
    int64_t n;
    if (to_bytes(x, &n) < 0) return -2;
    if (n <= 0) return -1;
    int64_t h = add_alloc(s, n, c);
    return h < 0 ? -2 : h;
}

static PyObject *S_alloc(StreamObject *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "alloc(nbytes, component)");
        return NULL;
    }
    int32_t c = name_id(s, args[1]);
    if (c < 0) return NULL;
    int64_t h = alloc_obj(s, args[0], c);
    if (h == -2) return NULL;
    touched(s);
    return PyLong_FromLongLong(h);
}

static int64_t handle_of(PyObject *o) {
    long long h = PyLong_AsLongLong(o);
    if (h == -1 && PyErr_Occurred()) return INT64_MIN;
    return h;
}

static PyObject *S_free(StreamObject *s, PyObject *arg) {
    int64_t h = handle_of(arg);
    if (h == INT64_MIN) return NULL;
    if (add_free(s, h) < 0) return NULL;
    touched(s);
    Py_RETURN_NONE;
}

/* the handles of sizes (an iterable) allocated in order, as a new list */
static PyObject *alloc_seq(StreamObject *s, PyObject *sizes, int32_t c) {
    PyObject *seq = PySequence_Fast(sizes, "sizes must be iterable");
    if (!seq) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(k);
    if (!out) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        int64_t h = alloc_obj(s, items[j], c);
        PyObject *v = h == -2 ? NULL : PyLong_FromLongLong(h);
        if (!v) {
            Py_DECREF(out);
            Py_DECREF(seq);
            return NULL;
        }
        PyList_SET_ITEM(out, j, v);
    }
    Py_DECREF(seq);
    return out;
}

static int free_seq(StreamObject *s, PyObject *handles) {
    PyObject *seq = PySequence_Fast(handles, "handles must be iterable");
    if (!seq) return -1;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t j = 0; j < k; j++) {
        int64_t h = handle_of(items[j]);
        if (h == INT64_MIN || add_free(s, h) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *S_alloc_all(StreamObject *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "alloc_all(sizes, component)");
        return NULL;
    }
    int32_t c = name_id(s, args[1]);
    if (c < 0) return NULL;
    touched(s);
    return alloc_seq(s, args[0], c);
}

static PyObject *S_free_all(StreamObject *s, PyObject *arg) {
    touched(s);
    if (free_seq(s, arg) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *S_regrow(StreamObject *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "regrow(held: list of lists, sizes, component)");
        return NULL;
    }
    PyObject *held = args[0];
    int32_t c = name_id(s, args[2]);
    if (c < 0) return NULL;
    touched(s);
    PyObject *seq = PySequence_Fast(args[1], "sizes must be iterable");
    if (!seq) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < k; i++) {
        if (i >= PyList_GET_SIZE(held)) {
            PyErr_SetString(PyExc_IndexError, "more sizes than held lists");
            goto error;
        }
        PyObject *fresh = alloc_seq(s, PySequence_Fast_GET_ITEM(seq, i), c);
        if (!fresh) goto error;
        if (free_seq(s, PyList_GET_ITEM(held, i)) < 0) {
            Py_DECREF(fresh);
            goto error;
        }
        if (PyList_SetItem(held, i, fresh) < 0) goto error; /* steals fresh */
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
error:
    Py_DECREF(seq);
    return NULL;
}

static PyObject *S_mark(StreamObject *s, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(nn)", s->nops, s->nh);
}

/* the (key, value) pairs of the outside map, sorted by key */
typedef struct {
    int64_t k, v;
    Py_ssize_t i; /* its order among the pairs */
} Pair;


/* the lowest index in the sorted pairs whose key is k, np when none; of several pairs with key k the last made
   wins (as the last of equal keys in a dict built from them): pairs of equal keys are sorted by their order */
static Py_ssize_t pair_find(const Pair *pairs, Py_ssize_t np, int64_t k) {
    Py_ssize_t lo = 0, hi = np;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (pairs[mid].k <= k)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (lo > 0 && pairs[lo - 1].k == k) ? lo - 1 : np;
}

/* the stretch from (o0, h0) appended again, outside handles mapped by the sorted pairs: 1 done (*d_out its
   handle offset), 0 not possible (nothing appended), -1 error */
static int repeat_core(StreamObject *s, Py_ssize_t o0, Py_ssize_t h0, const Pair *pairs, Py_ssize_t np,
                       int64_t *d_out) {
    if (o0 < 0 || o0 > s->nops || h0 < 0 || h0 > s->nh) {
        PyErr_SetString(PyExc_ValueError, "repeat: a start the stream does not hold");
        return -1;
    }
    if ((s->nmarks && s->marks[s->nmarks - 1] >= o0) || (s->nresets && s->resets[s->nresets - 1] >= o0)) return 0;
    for (Py_ssize_t j = 0; j < np; j++) {
        if (j + 1 < np && pairs[j + 1].k == pairs[j].k) continue; /* a later pair of the same key maps it */
        int64_t a = pairs[j].k, m = pairs[j].v;
        /* every mapped tensor exists and has the bytes of the one it stands for */
        if (a < 0 || m < 0 || a >= s->nh || m >= s->nh || s->hsize[a] != s->hsize[m]) return 0;
    }
    Py_ssize_t n_stretch = s->nops - o0, h1 = s->nh, n_new = h1 - h0;
    int64_t d = (int64_t)(h1 - h0);
    if (room_ops(s, n_stretch) < 0 || room_handles(s, n_new) < 0) return -1;
    Py_ssize_t nops0 = s->nops;
    for (Py_ssize_t i = o0; i < nops0; i++) {
        const int64_t *o = s->ops + 4 * i;
        int64_t k = o[0], h = o[1];
        if (k == OP_ALLOC) {
            put_op(s, OP_ALLOC, h + d, o[2], o[3]);
        } else if (k == OP_FREE) {
            if (h >= h0) {
                put_op(s, OP_FREE, h + d, o[2], o[3]);
            } else {
                Py_ssize_t at = pair_find(pairs, np, h);
                if (at >= np) { /* a tensor from before the stretch that nothing maps */
                    s->nops = nops0;
                    return 0;
                }
                int64_t m = pairs[at].v;
                put_op(s, OP_FREE, m, s->hsize[m], s->hcomp[m]);
            }
        } else { /* a mark or reset in the stretch (checked above: none) */
            s->nops = nops0;
            return 0;
        }
    }
    memcpy(s->hsize + h1, s->hsize + h0, (size_t)n_new * sizeof(int64_t));
    memcpy(s->hcomp + h1, s->hcomp + h0, (size_t)n_new * sizeof(int32_t));
    s->nh = h1 + n_new;
    touched(s);
    *d_out = d;
    return 1;
}

static int pair_cmp_stable(const void *a, const void *b) {
    const Pair *x = a, *y = b;
    if (x->k != y->k) return (x->k > y->k) - (x->k < y->k);
    return (x->i > y->i) - (x->i < y->i);
}

/* the pairs sorted by (key, order): an insertion sort for the few a layer maps (qsort's merge sort allocates
   and calls the comparison through a pointer), qsort past that */
static void sort_pairs(Pair *pairs, Py_ssize_t np) {
    if (np > 64) {
        qsort(pairs, (size_t)np, sizeof(Pair), pair_cmp_stable);
        return;
    }
    for (Py_ssize_t i = 1; i < np; i++) {
        Pair x = pairs[i];
        Py_ssize_t j = i;
        while (j > 0 && (pairs[j - 1].k > x.k || (pairs[j - 1].k == x.k && pairs[j - 1].i > x.i))) {
            pairs[j] = pairs[j - 1];
            j--;
        }
        pairs[j] = x;
    }
}

static int start_of(PyObject *t, Py_ssize_t *o0, Py_ssize_t *h0) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2) {
        PyErr_SetString(PyExc_TypeError, "repeat: start must be a mark() (ops, handles)");
        return -1;
    }
    *o0 = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 0));
    *h0 = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 1));
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *S_repeat(StreamObject *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != 2 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "repeat((ops, handles), outside: dict)");
        return NULL;
    }
    Py_ssize_t o0, h0;
    if (start_of(args[0], &o0, &h0) < 0) return NULL;
    PyObject *outside = args[1];
    Py_ssize_t np = PyDict_GET_SIZE(outside), pos = 0, j = 0;
    Pair *pairs = PyMem_Malloc((size_t)(np ? np : 1) * sizeof(Pair));
    if (!pairs) return PyErr_NoMemory();
    PyObject *key, *value;
    while (PyDict_Next(outside, &pos, &key, &value)) {
        long long a = PyLong_AsLongLong(key), b = PyLong_AsLongLong(value);
        if ((a == -1 || b == -1) && PyErr_Occurred()) {
            PyMem_Free(pairs);
            return NULL;
        }
        pairs[j].k = a;
        pairs[j].v = b;
        pairs[j].i = j;
        j++;
    }
    sort_pairs(pairs, np);
    int64_t d = 0;
    int r = repeat_core(s, o0, h0, pairs, np, &d);
    PyMem_Free(pairs);
    if (r < 0) return NULL;
    if (r == 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(d);
}

/* the handles of list t, each >= 0 shifted by d, sub_from replaced by sub_to (checked first), -1 kept */
static PyObject *shifted(PyObject *t, int64_t d, int64_t sub_from, int64_t sub_to) {
    Py_ssize_t n = PyList_GET_SIZE(t);
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long h = PyLong_AsLongLong(PyList_GET_ITEM(t, i));
        if (h == -1 && PyErr_Occurred()) {
            Py_DECREF(out);
            return NULL;
        }
        long long v = h == sub_from ? sub_to : (h >= 0 ? h + d : -1);
        PyObject *x = PyLong_FromLongLong(v);
        if (!x) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, x);
    }
    return out;
}

/* the pairs of keys[i] -> values[i] over the lists of two equally long tuples of lists, pairs with key -1 left
   out (as a dict built from them with its -1 popped); NULL on error (set), *np their count */
static Pair *pairs_of(PyObject *keys, PyObject *values, Py_ssize_t *np) {
    Py_ssize_t nk = 0, nv = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++) nk += PyList_GET_SIZE(PyTuple_GET_ITEM(keys, i));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(values); i++) nv += PyList_GET_SIZE(PyTuple_GET_ITEM(values, i));
    if (nk != nv) {
        PyErr_SetString(PyExc_ValueError, "repeat_map: as many keys as values");
        return NULL;
    }
    Pair *pairs = PyMem_Malloc((size_t)(nk ? nk : 1) * sizeof(Pair));
    if (!pairs) {
        PyErr_NoMemory();
        return NULL;
    }
    Py_ssize_t j = 0, a = 0, ai = 0, b = 0, bi = 0;
    for (Py_ssize_t n = 0; n < nk; n++) {
        while (ai >= PyList_GET_SIZE(PyTuple_GET_ITEM(keys, a))) a++, ai = 0;
        while (bi >= PyList_GET_SIZE(PyTuple_GET_ITEM(values, b))) b++, bi = 0;
        long long k = PyLong_AsLongLong(PyList_GET_ITEM(PyTuple_GET_ITEM(keys, a), ai++));
        long long v = PyLong_AsLongLong(PyList_GET_ITEM(PyTuple_GET_ITEM(values, b), bi++));
        if ((k == -1 || v == -1) && PyErr_Occurred()) {
            PyMem_Free(pairs);
            return NULL;
        }
        if (k == -1) continue;
        pairs[j].k = k;
        pairs[j].v = v;
        pairs[j].i = j;
        j++;
    }
    sort_pairs(pairs, j);
    *np = j;
    return pairs;
}

static int lists_tuple(PyObject *t) {
    if (!PyTuple_Check(t)) return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); i++)
        if (!PyList_Check(PyTuple_GET_ITEM(t, i))) return 0;
    return 1;
}

static PyObject *S_repeat_map(StreamObject *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !lists_tuple(args[1]) || !lists_tuple(args[2]) || !lists_tuple(args[3])) {
        PyErr_SetString(PyExc_TypeError, "repeat_map(start, keys: tuple of lists, values: tuple of lists, "
                                         "lists: tuple of lists, sub_from: int, sub_to: int)");
        return NULL;
    }
    Py_ssize_t o0, h0, np = 0;
    if (start_of(args[0], &o0, &h0) < 0) return NULL;
    long long sub_from = PyLong_AsLongLong(args[4]), sub_to = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) return NULL;
    Pair *pairs = pairs_of(args[1], args[2], &np);
    if (!pairs) return NULL;
    int64_t d = 0;
    int r = repeat_core(s, o0, h0, pairs, np, &d);
    PyMem_Free(pairs);
    if (r < 0) return NULL;
    if (r == 0) Py_RETURN_NONE;
    Py_ssize_t nl = PyTuple_GET_SIZE(args[3]);
    PyObject *out = PyTuple_New(nl + 1);
    if (!out) return NULL;
    PyObject *dd = PyLong_FromLongLong(d);
    if (!dd) {
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, dd);
    for (Py_ssize_t i = 0; i < nl; i++) {
        PyObject *x = shifted(PyTuple_GET_ITEM(args[3], i), d, sub_from, sub_to);
        if (!x) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i + 1, x);
    }
    return out;
}

static int push_index(StreamObject *s, Py_ssize_t **a, Py_ssize_t *n, Py_ssize_t *cap, Py_ssize_t v) {
    if (*n >= *cap) {
        Py_ssize_t c = *cap ? *cap * 2 : 16;
        Py_ssize_t *b = PyMem_Realloc(*a, (size_t)c * sizeof(Py_ssize_t));
        if (!b) {
            PyErr_NoMemory();
            return -1;
        }
        *a = b;
        *cap = c;
    }
    (*a)[(*n)++] = v;
    (void)s;
    return 0;
}

/* the stretch [start, end) appended again as a later pass of the code that made it emits it: each tensor the
   stretch frees made anew (new handles, in order), each it never frees left out (made once: it persists, as a
   training step's optimizer states and cuBLAS workspaces do), its phase marks repeated; Py_True, or None with
   nothing appended where the stretch frees a tensor from outside it or holds a reset */
static PyObject *S_again(StreamObject *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "again(start, end): two mark()s");
        return NULL;
    }
    Py_ssize_t o0, h0, o1, h1;
    if (start_of(args[0], &o0, &h0) < 0 || start_of(args[1], &o1, &h1) < 0) return NULL;
    if (o0 < 0 || o1 < o0 || o1 > s->nops || h0 < 0 || h1 < h0 || h1 > s->nh) {
        PyErr_SetString(PyExc_ValueError, "again: a stretch the stream does not hold");
        return NULL;
    }
    for (Py_ssize_t j = 0; j < s->nresets; j++)
        if (s->resets[j] >= o0 && s->resets[j] < o1) Py_RETURN_NONE;
    Py_ssize_t nh = h1 - h0;
    size_t map_cap;
    int64_t *map = keep_take((size_t)(nh ? nh : 1) * sizeof(int64_t), &map_cap, 0);
    if (!map) return PyErr_NoMemory();
    for (Py_ssize_t j = 0; j < nh; j++) map[j] = -1;
    Py_ssize_t n_ops = 0, n_new = 0;
    for (Py_ssize_t i = o0; i < o1; i++) {
        const int64_t *o = s->ops + 4 * i;
        if (o[0] == OP_FREE) {
            if (o[1] < h0 || o[1] >= h1) {
                keep_give(map, map_cap);
                Py_RETURN_NONE;
            }
            map[o[1] - h0] = 0;
        } else if (o[0] != OP_ALLOC && o[0] != OP_PHASE) {
            keep_give(map, map_cap);
            Py_RETURN_NONE;
        }
    }
    for (Py_ssize_t j = 0; j < nh; j++)
        if (map[j] == 0) map[j] = s->nh + n_new++;
    for (Py_ssize_t i = o0; i < o1; i++) {
        const int64_t *o = s->ops + 4 * i;
        if (o[0] != OP_ALLOC || map[o[1] - h0] >= 0) n_ops++;
    }
    if (room_ops(s, n_ops) < 0 || room_handles(s, n_new) < 0) {
        keep_give(map, map_cap);
        return NULL;
    }
    int32_t last_phase = -1;
    for (Py_ssize_t i = o0; i < o1; i++) {
        const int64_t *o = s->ops + 4 * i;
        int64_t k = o[0], a = o[1], b = o[2], c = o[3];
        if (k == OP_ALLOC) {
            int64_t h = map[a - h0];
            if (h < 0) continue;
            s->hsize[h] = b;
            s->hcomp[h] = (int32_t)c;
            put_op(s, OP_ALLOC, h, b, c);
        } else if (k == OP_FREE) {
            put_op(s, OP_FREE, map[a - h0], b, c);
        } else {
            if (push_index(s, &s->marks, &s->nmarks, &s->capmarks, s->nops) < 0) {
                keep_give(map, map_cap);
                return NULL; /* the operations so far stay: an error leaves the stream unusable, as others do */
            }
            put_op(s, OP_PHASE, a, 0, 0);
            last_phase = (int32_t)a;
        }
    }
    s->nh += n_new;
    keep_give(map, map_cap);
    if (last_phase >= 0) {
        PyObject *name = PyList_GET_ITEM(s->names, last_phase);
        Py_INCREF(name);
        Py_SETREF(s->phase_name, name);
    }
    touched(s);
    Py_RETURN_TRUE;
}

/* count more passes of a loop whose last two passes are the stretches a-b and b-end (see events.PyStream.extend):
   the handle offset of the last pass from the second stretch, or None with nothing appended */
static PyObject *S_extend(StreamObject *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "extend(a, b, end, count): three mark()s and a count");
        return NULL;
    }
    Py_ssize_t oa, ha, ob, hb, oe, he;
    if (start_of(args[0], &oa, &ha) < 0 || start_of(args[1], &ob, &hb) < 0 || start_of(args[2], &oe, &he) < 0)
        return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[3]);
    if (count == -1 && PyErr_Occurred()) return NULL;
    int64_t d = (int64_t)hb - ha;
    if (oe != s->nops || he != s->nh || he - hb != d || d <= 0 || oe - ob != ob - oa || oa < 0 || ha < 0 ||
        ob < oa || count < 0)
        Py_RETURN_NONE;
    if (count > (PY_SSIZE_T_MAX / 8) / (oe - ob + d)) {
        PyErr_SetString(PyExc_OverflowError, "extend: too many passes");
        return NULL;
    }
    if ((s->nmarks && s->marks[s->nmarks - 1] >= oa) || (s->nresets && s->resets[s->nresets - 1] >= oa))
        Py_RETURN_NONE;
    Py_ssize_t n = oe - ob;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t *x = s->ops + 4 * (oa + i), *y = s->ops + 4 * (ob + i);
        if (x[0] != y[0] || y[1] != x[1] + d) Py_RETURN_NONE;
        if (y[0] == OP_ALLOC) {
            if (x[3] != y[3]) Py_RETURN_NONE;
            __int128 last = (__int128)y[2] + (__int128)count * (y[2] - x[2]);
            if (last <= 0 || last >= MAX_BYTES) Py_RETURN_NONE;
        } else if (y[0] != OP_FREE) {
            Py_RETURN_NONE;
        }
    }
    if (count == 0) return PyLong_FromLongLong(0);
    if (room_ops(s, n * count) < 0 || room_handles(s, (Py_ssize_t)d * count) < 0) return NULL;
    for (Py_ssize_t k = 1; k <= count; k++) {
        for (Py_ssize_t i = 0; i < n; i++) {
            /* the second stretch (and the first, for the growth) at their fixed places: the room is made above */
            const int64_t *x = s->ops + 4 * (oa + i), *y = s->ops + 4 * (ob + i);
            if (y[0] == OP_ALLOC) {
                int64_t bytes = y[2] + (int64_t)k * (y[2] - x[2]);
                int64_t h = s->nh++;
                s->hsize[h] = bytes;
                s->hcomp[h] = (int32_t)y[3];
                put_op(s, OP_ALLOC, h, bytes, y[3]);
            } else {
                int64_t h = y[1] + (int64_t)k * d;
                put_op(s, OP_FREE, h, s->hsize[h], s->hcomp[h]);
            }
        }
    }
    touched(s);
    return PyLong_FromLongLong((long long)(d * count));
}

static PyObject *S_phase(StreamObject *s, PyObject *name) {
    int32_t id = name_id(s, name);
    if (id < 0) return NULL;
    if (room_ops(s, 1) < 0 || push_index(s, &s->marks, &s->nmarks, &s->capmarks, s->nops) < 0) return NULL;
    put_op(s, OP_PHASE, id, 0, 0);
    Py_INCREF(name);
    Py_SETREF(s->phase_name, name);
    touched(s);
    Py_RETURN_NONE;
}

static PyObject *S_reset_peaks(StreamObject *s, PyObject *unused) {
    (void)unused;
    if (room_ops(s, 1) < 0 || push_index(s, &s->resets, &s->nresets, &s->capresets, s->nops) < 0) return NULL;
    put_op(s, OP_RESET, 0, 0, 0);
    touched(s);
    Py_RETURN_NONE;
}

/* operation i as PyStream's tuple */
static PyObject *op_tuple(StreamObject *s, Py_ssize_t i) {
    const int64_t *o = s->ops + 4 * i;
    switch (o[0]) {
    case OP_ALLOC:
        return Py_BuildValue("(iLLO)", 0, (long long)o[1], (long long)o[2], PyList_GET_ITEM(s->names, o[3]));
    case OP_FREE:
        return Py_BuildValue("(iL)", 1, (long long)o[1]);
    case OP_PHASE:
        return Py_BuildValue("(iO)", 2, PyList_GET_ITEM(s->names, o[1]));
    default:
        return Py_BuildValue("(i)", 3);
    }
}

static PyObject *S_op(StreamObject *s, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (i < 0) i += s->nops;
    if (i < 0 || i >= s->nops) {
        PyErr_SetString(PyExc_IndexError, "operation index out of range");
        return NULL;
    }
    return op_tuple(s, i);
}

/* the name of the last phase mark before operation i ("" when none) */
static PyObject *S_phase_at(StreamObject *s, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t lo = 0, hi = s->nmarks; /* the first mark at or after i */
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (s->marks[mid] < i)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0) return PyUnicode_FromString("");
    PyObject *name = PyList_GET_ITEM(s->names, s->ops[4 * s->marks[lo - 1] + 1]);
    Py_INCREF(name);
    return name;
}

static PyObject *S_get_ops(StreamObject *s, void *closure) {
    (void)closure;
    if (!s->ops_cache) {
        PyObject *out = PyList_New(s->nops);
        if (!out) return NULL;
        for (Py_ssize_t i = 0; i < s->nops; i++) {
            PyObject *t = op_tuple(s, i);
            if (!t) {
                Py_DECREF(out);
                return NULL;
            }
            PyList_SET_ITEM(out, i, t);
        }
        s->ops_cache = out;
    }
    Py_INCREF(s->ops_cache);
    return s->ops_cache;
}

static PyObject *S_get_handles(StreamObject *s, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(s->nh);
}

static PyObject *S_get_phase_name(StreamObject *s, void *closure) {
    (void)closure;
    Py_INCREF(s->phase_name);
    return s->phase_name;
}

static PyObject *S_get_accounted(StreamObject *s, void *closure) {
    (void)closure;
    PyObject *r = s->accounted ? s->accounted : Py_None;
    Py_INCREF(r);
    return r;
}

static int S_set_accounted(StreamObject *s, PyObject *v, void *closure) {
    (void)closure;
    Py_XINCREF(v);
    Py_XSETREF(s->accounted, v);
    return 0;
}

/* events._account_fast's walk: (peak, peak_at, peak_phase, phases, components), None when a figure passes 64
   bits (the caller then walks the tuples in Python) */
static PyObject *S_account(StreamObject *s, PyObject *unused) {
    (void)unused;
    Py_ssize_t n = s->nops;
    size_t live_cap;
    int64_t *live = keep_take((size_t)(n ? n : 1) * sizeof(int64_t), &live_cap, 0);
    uint8_t *dead = NULL;
    int64_t *sums = NULL;
    int32_t *first = NULL;
    PyObject *phases = NULL, *comps = NULL, *result = NULL, *peak_phase = NULL, *empty = NULL;
    if (!live) return PyErr_NoMemory();
    int64_t run = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t *o = s->ops + 4 * i;
        if (o[0] == OP_ALLOC) {
            if (__builtin_add_overflow(run, o[2], &run)) goto fallback;
        } else if (o[0] == OP_FREE) {
            run -= o[2];
        }
        live[i] = run;
    }
    Py_ssize_t r0 = 0, reset_at = -1, peak_at = -1;
    int64_t peak = -1;
    if (s->nresets) {
        r0 = reset_at = s->resets[s->nresets - 1];
        peak = live[r0];
        peak_at = r0;
        for (Py_ssize_t i = r0 + 1; i < n; i++)
            if (live[i] > peak) {
                peak = live[i];
                peak_at = i;
            }
    } else if (s->nh && n) {
        peak = live[0];
        peak_at = 0;
        for (Py_ssize_t i = 1; i < n; i++)
            if (live[i] > peak) {
                peak = live[i];
                peak_at = i;
            }
    }
    phases = PyDict_New();
    peak_phase = PyUnicode_FromString("");
    if (!phases || !peak_phase) goto error;
    empty = peak_phase; /* "" (its own reference: peak_phase may be replaced below) */
    Py_INCREF(empty);
    for (Py_ssize_t j = 0; j <= s->nmarks; j++) {
        Py_ssize_t start = j ? s->marks[j - 1] : 0;
        Py_ssize_t end = j < s->nmarks ? s->marks[j] : n;
        if (end <= r0 && reset_at >= 0) continue;
        PyObject *name = j == 0 ? empty : PyList_GET_ITEM(s->names, s->ops[4 * start + 1]);
        if (start <= peak_at && peak_at < end) {
            Py_INCREF(name);
            Py_SETREF(peak_phase, name);
        }
        if (PyUnicode_GET_LENGTH(name) == 0) continue;
        int64_t best = -1;
        if (reset_at >= 0 && start <= r0) {
            for (Py_ssize_t i = r0 + 1; i < end; i++)
                if (s->ops[4 * i] == OP_ALLOC && live[i] > best) best = live[i];
        } else {
            for (Py_ssize_t i = start; i < end; i++)
                if (live[i] > best) best = live[i];
        }
        if (best >= 0) {
            PyObject *old = PyDict_GetItemWithError(phases, name);
            if (!old && PyErr_Occurred()) goto error;
            long long ov = old ? PyLong_AsLongLong(old) : -1;
            if (ov == -1 && PyErr_Occurred()) goto error;
            if (best > ov) {
                PyObject *v = PyLong_FromLongLong(best);
                if (!v || PyDict_SetItem(phases, name, v) < 0) {
                    Py_XDECREF(v);
                    goto error;
                }
                Py_DECREF(v);
            }
        }
    }
    /* components of the tensors alive at the peak, in the order they first appear among the handles */
    comps = PyDict_New();
    if (!comps) goto error;
    if (peak_at >= 0) {
        Py_ssize_t nh = 0;
        for (Py_ssize_t i = peak_at; i >= 0; i--)
            if (s->ops[4 * i] == OP_ALLOC) {
                nh = (Py_ssize_t)s->ops[4 * i + 1] + 1;
                break;
            }
        Py_ssize_t nn = PyList_GET_SIZE(s->names);
        dead = PyMem_Calloc((size_t)(nh ? nh : 1), 1);
        sums = PyMem_Calloc((size_t)(nn ? nn : 1), sizeof(int64_t));
        first = PyMem_Malloc((size_t)(nn ? nn : 1) * sizeof(int32_t));
        if (!dead || !sums || !first) {
            PyErr_NoMemory();
            goto error;
        }
        for (Py_ssize_t i = 0; i <= peak_at; i++) {
            const int64_t *o = s->ops + 4 * i;
            if (o[0] == OP_FREE && o[1] < nh) dead[o[1]] = 1;
        }
        Py_ssize_t nfirst = 0;
        uint8_t *seen = PyMem_Calloc((size_t)(nn ? nn : 1), 1);
        if (!seen) {
            PyErr_NoMemory();
            goto error;
        }
        for (Py_ssize_t h = 0; h < nh; h++) {
            int32_t c = s->hcomp[h];
            if (!seen[c]) {
                seen[c] = 1;
                first[nfirst++] = c;
            }
            if (!dead[h] && __builtin_add_overflow(sums[c], s->hsize[h], &sums[c])) {
                PyMem_Free(seen);
                goto fallback;
            }
        }
        PyMem_Free(seen);
        for (Py_ssize_t k = 0; k < nfirst; k++) {
            int32_t c = first[k];
            if (!sums[c]) continue;
            PyObject *v = PyLong_FromLongLong(sums[c]);
            if (!v || PyDict_SetItem(comps, PyList_GET_ITEM(s->names, c), v) < 0) {
                Py_XDECREF(v);
                goto error;
            }
            Py_DECREF(v);
        }
    }
    result = Py_BuildValue("(LnOOO)", (long long)peak, peak_at, peak_phase, phases, comps);
    goto done;
fallback:
    Py_INCREF(Py_None);
    result = Py_None;
    goto done;
error:
    result = NULL;
done:
    keep_give(live, live_cap);
    PyMem_Free(dead);
    PyMem_Free(sums);
    PyMem_Free(first);
    Py_XDECREF(phases);
    Py_XDECREF(comps);
    Py_XDECREF(peak_phase);
    Py_XDECREF(empty);
    return result;
}

static Py_ssize_t S_len(StreamObject *s) {
    return s->nops;
}

static int S_getbuffer(StreamObject *s, Py_buffer *view, int flags) {
    static char fmt[] = "q";
    if (!s->ops && room_ops(s, 1) < 0) return -1; /* a non-NULL buffer even when empty */
    view->buf = s->ops;
    view->obj = (PyObject *)s;
    Py_INCREF(s);
    view->len = s->nops * 4 * (Py_ssize_t)sizeof(int64_t);
    view->readonly = 1;
    view->itemsize = sizeof(int64_t);
    view->format = (flags & PyBUF_FORMAT) ? fmt : NULL;
    view->ndim = 1;
    view->shape = NULL;
    view->strides = NULL;
    view->suboffsets = NULL;
    view->internal = NULL;
    if (flags & PyBUF_ND) {
        view->shape = PyMem_Malloc(sizeof(Py_ssize_t));
        if (!view->shape) {
            Py_DECREF(s);
            view->obj = NULL;
            PyErr_NoMemory();
            return -1;
        }
        view->shape[0] = s->nops * 4;
        view->internal = view->shape;
    }
    if ((flags & PyBUF_STRIDES) == PyBUF_STRIDES) view->strides = &view->itemsize;
    s->exports++;
    return 0;
}

static void S_releasebuffer(StreamObject *s, Py_buffer *view) {
    PyMem_Free(view->internal);
    s->exports--;
}

static PyBufferProcs S_as_buffer = {(getbufferproc)S_getbuffer, (releasebufferproc)S_releasebuffer};

static int S_init(StreamObject *s, PyObject *args, PyObject *kw) {
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Stream() takes no arguments");
        return -1;
    }
    if (s->names) return 0;
    s->names = PyList_New(0);
    s->ids = PyDict_New();
    s->phase_name = PyUnicode_FromString("");
    if (!s->names || !s->ids || !s->phase_name) return -1;
    s->last_str = NULL;
    return 0;
}

static int S_traverse(StreamObject *s, visitproc visit, void *arg) {
    Py_VISIT(s->names);
    Py_VISIT(s->ids);
    Py_VISIT(s->accounted);
    Py_VISIT(s->phase_name);
    Py_VISIT(s->ops_cache);
    return 0;
}

static int S_clear(StreamObject *s) {
    Py_CLEAR(s->names);
    Py_CLEAR(s->ids);
    Py_CLEAR(s->accounted);
    Py_CLEAR(s->phase_name);
    Py_CLEAR(s->ops_cache);
    s->last_str = NULL;
    return 0;
}

static void S_dealloc(StreamObject *s) {
    PyObject_GC_UnTrack(s);
    S_clear(s);
    keep_give(s->ops, (size_t)s->capops * 4 * sizeof(int64_t));
    keep_give(s->hsize, (size_t)s->caph * sizeof(int64_t));
    keep_give(s->hcomp, (size_t)s->caph * sizeof(int32_t));
    PyMem_Free(s->marks);
    PyMem_Free(s->resets);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* The stream of the same run at another micro-batch, from this one (made at micro-batch ba) and other (the same
   job at bb): a training stream's operations do not depend on the micro-batch, and each size is affine in it (the
   micro-batch's tokens times bytes per token, plus bytes that do not scale). Each size is computed as
   a + (b - a) (batch - ba) / (bb - ba) in whole bytes; None where the two are not the same operations (kinds,
   handles, components, phase marks and resets, names) or a size would not come out whole or positive. */
static PyObject *S_interpolate(StreamObject *a, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || Py_TYPE(args[0]) != Py_TYPE((PyObject *)a)) {
        PyErr_SetString(PyExc_TypeError, "interpolate(other: Stream, ba, bb, batch)");
        return NULL;
    }
    StreamObject *b = (StreamObject *)args[0];
    long long ba = PyLong_AsLongLong(args[1]), bb = PyLong_AsLongLong(args[2]), bt = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (ba == bb || ba < 1 || bb < 1 || bt < 1) {
        PyErr_SetString(PyExc_ValueError, "interpolate: two different micro-batches >= 1 and a batch >= 1");
        return NULL;
    }
    if (a->nops != b->nops || a->nh != b->nh || a->nmarks != b->nmarks || a->nresets != b->nresets)
        Py_RETURN_NONE;
    if (a->nmarks && memcmp(a->marks, b->marks, (size_t)a->nmarks * sizeof(Py_ssize_t))) Py_RETURN_NONE;
    if (a->nresets && memcmp(a->resets, b->resets, (size_t)a->nresets * sizeof(Py_ssize_t))) Py_RETURN_NONE;
    int same = PyObject_RichCompareBool(a->names, b->names, Py_EQ);
    if (same < 0) return NULL;
    if (!same) Py_RETURN_NONE;
    const __int128 num = (__int128)bt - ba, den = (__int128)bb - ba;
    StreamObject *s = (StreamObject *)PyObject_CallNoArgs((PyObject *)Py_TYPE((PyObject *)a));
    if (!s) return NULL;
    if (room_ops(s, a->nops) < 0 || room_handles(s, a->nh) < 0) goto fail;
    for (Py_ssize_t i = 0; i < a->nh; i++) {
        int64_t x = a->hsize[i], y = b->hsize[i];
        if (a->hcomp[i] != b->hcomp[i]) goto none;
        __int128 t = (__int128)(y - x) * num;
        if (t % den) goto none;
        __int128 v = (__int128)x + t / den;
        if (v <= 0 || v >= ((__int128)1 << 62)) goto none;
        s->hsize[i] = (int64_t)v;
        s->hcomp[i] = a->hcomp[i];
    }
    const int64_t *oa = a->ops, *ob = b->ops;
    int64_t *os = s->ops;
    for (Py_ssize_t i = 0; i < a->nops; i++, oa += 4, ob += 4, os += 4) {
        if (oa[0] != ob[0] || oa[1] != ob[1] || oa[3] != ob[3]) goto none;
        os[0] = oa[0];
        os[1] = oa[1];
        os[3] = oa[3];
        if (oa[0] == OP_ALLOC || oa[0] == OP_FREE) {
            if (oa[1] < 0 || oa[1] >= a->nh) goto none;
            os[2] = s->hsize[oa[1]];
        } else {
            if (oa[2] != ob[2]) goto none;
            os[2] = oa[2];
        }
    }
    s->nops = a->nops;
    s->nh = a->nh;
    for (Py_ssize_t i = 0; i < a->nmarks; i++)
        if (push_index(s, &s->marks, &s->nmarks, &s->capmarks, a->marks[i]) < 0) goto fail;
    for (Py_ssize_t i = 0; i < a->nresets; i++)
        if (push_index(s, &s->resets, &s->nresets, &s->capresets, a->resets[i]) < 0) goto fail;
    {
        PyObject *names = PyList_GetSlice(a->names, 0, PyList_GET_SIZE(a->names));
        PyObject *ids = names ? PyDict_Copy(a->ids) : NULL;
        if (!ids) {
            Py_XDECREF(names);
            goto fail;
        }
        Py_SETREF(s->names, names);
        Py_SETREF(s->ids, ids);
        s->last_str = NULL;
        Py_INCREF(a->phase_name);
        Py_SETREF(s->phase_name, a->phase_name);
    }
    return (PyObject *)s;
none:
    Py_DECREF(s);
    Py_RETURN_NONE;
fail:
    Py_DECREF(s);
    return NULL;
}

static PyMethodDef S_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))S_alloc, METH_FASTCALL,
     "alloc(nbytes, component) -> handle: one tensor of int(round(nbytes)) bytes (-1 for zero bytes or less)"},
    {"free", (PyCFunction)S_free, METH_O, "free(handle): a free of that tensor (none for -1)"},
    {"alloc_all", (PyCFunction)(void (*)(void))S_alloc_all, METH_FASTCALL,
     "alloc_all(sizes, component) -> handles: alloc of each, in order"},
    {"free_all", (PyCFunction)S_free_all, METH_O, "free_all(handles): free of each, in order"},
    {"regrow", (PyCFunction)(void (*)(void))S_regrow, METH_FASTCALL,
     "regrow(held, sizes, component): for each i, alloc the tensors of sizes[i], free those of held[i], which "
     "become the new ones"},
    {"mark", (PyCFunction)S_mark, METH_NOARGS, "mark() -> (operations, handles) so far: a start for repeat"},
    {"repeat", (PyCFunction)(void (*)(void))S_repeat, METH_FASTCALL,
     "repeat(start, outside) -> handle offset | None: the stretch from start again (see events.PyStream.repeat)"},
    {"repeat_map", (PyCFunction)(void (*)(void))S_repeat_map, METH_FASTCALL,
     "repeat_map(start, keys, values, lists, sub_from, sub_to) -> (offset, *shifted lists) | None "
     "(see events.PyStream.repeat_map)"},
    {"phase", (PyCFunction)S_phase, METH_O, "phase(name): a phase mark"},
    {"extend", (PyCFunction)(void (*)(void))S_extend, METH_FASTCALL,
     "extend(a, b, end, count) -> handle offset | None: count more passes of the loop whose last two passes are "
     "the stretches a-b and b-end, sizes affine in the pass (see events.PyStream.extend)"},
    {"again", (PyCFunction)(void (*)(void))S_again, METH_FASTCALL,
     "again(start, end): the stretch between two mark()s made again (the tensors it frees made anew, those it "
     "keeps left out); True, or None with nothing appended"},
    {"reset_peaks", (PyCFunction)S_reset_peaks, METH_NOARGS, "reset_peaks(): torch.cuda.reset_peak_memory_stats()"},
    {"account", (PyCFunction)S_account, METH_NOARGS,
     "account() -> (peak, peak_at, peak_phase, phases, components) | None: events.account's walk"},
    {"op", (PyCFunction)S_op, METH_O, "op(i) -> operation i as a tuple"},
    {"interpolate", (PyCFunction)(void (*)(void))S_interpolate, METH_FASTCALL,
     "interpolate(other, ba, bb, batch) -> the stream at micro-batch batch from this one (at ba) and other (at bb),\n"
     "each size affine in the micro-batch; None where the two are not the same operations or a size is not whole"},
    {"phase_at", (PyCFunction)S_phase_at, METH_O, "phase_at(i) -> the phase operation i is in"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef S_getset[] = {
    {"ops", (getter)S_get_ops, NULL, "the operations as tuples (made when asked for; read only)", NULL},
    {"handles", (getter)S_get_handles, NULL, "allocations made so far", NULL},
    {"phase_name", (getter)S_get_phase_name, NULL, "the last phase mark's name", NULL},
    {"accounted", (getter)S_get_accounted, (setter)S_set_accounted, "the stream's account, once made", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods S_as_sequence = {(lenfunc)S_len};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memfit.estimator._events.Stream",
    .tp_basicsize = sizeof(StreamObject),
    .tp_dealloc = (destructor)S_dealloc,
    .tp_as_sequence = &S_as_sequence,
    .tp_as_buffer = &S_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Allocations and frees of one run, in order (events.PyStream, compiled: see _events.c).",
    .tp_traverse = (traverseproc)S_traverse,
    .tp_clear = (inquiry)S_clear,
    .tp_methods = S_methods,
    .tp_getset = S_getset,
    .tp_init = (initproc)S_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "memfit.estimator._events",
    "The estimate's event stream, compiled (see _events.c).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__events(void) {
    if (PyType_Ready(&StreamType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&StreamType);
    if (PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(&StreamType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
