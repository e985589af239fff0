/* Stream building for memfit.estimator.events, compiled: the copy of one layer's stretch of the event stream
   for the next identical layer (Stream.repeat), and a decode step's cache growth (Stream.regrow), which the
   Python fallbacks do one Python step per event.

   regrow(ops, size, comp, delta, held, sizes, component, next_handle) -> next_handle
       Stream.regrow's loop on the stream's own lists (ops, and the per-handle sizes and components and the
       per-op deltas kept beside them): for each i, allocate the int(round(x)) of sizes[i] (none for <= 0:
       -1), free the handles of held[i], put the new handles in held[i].

   repeat_stretch(ops, start, first_handle, offset, outside) -> list | None
       the operations ops[start:] again: a malloc (0, h, bytes, component) becomes (0, h + offset, bytes,
       component); a free (1, h) of a handle made in the stretch (h >= first_handle) becomes (1, h + offset),
       of one from before it (1, outside[h]); None when such a handle is not in outside or an operation is
       neither a malloc nor a free (the caller then builds the layer instead).

   account(ops, delta, size, comp, marks, resets) -> (peak, peak_at, peak_phase, phases, components) | None
       events._account_fast's walk by tensor bytes (see there), one pass in C; None when a figure passes 64
       bits (the caller then walks in Python).

   tests/test_stream_repeat.py builds every registry model's streams with and without the copy and compares
   them; MEMFIT_PURE_PYTHON=1 makes memfit use the Python fallback. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>

/* An operation tuple holds ints and a str only: it can be in no reference cycle, so the cyclic garbage
   collector need not track it (CPython untracks such tuples itself, but only once a collection has visited
   them: with streams of tens of thousands of tuples those visits were a third of the build's time). */
static void untrack_if_atomic(PyObject *t) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); i++) {
        PyObject *x = PyTuple_GET_ITEM(t, i);
        if (!PyLong_CheckExact(x) && !PyUnicode_CheckExact(x)) return;
    }
    PyObject_GC_UnTrack(t);
}

/* a new operation tuple: (kind, h, n, component), or (kind, h) when n is NULL (the arguments borrowed) */
static PyObject *op_tuple(PyObject *kind, PyObject *h, PyObject *n, PyObject *component) {
    PyObject *items[4] = {kind, h, n, component};
    Py_ssize_t k = n ? 4 : 2;
    PyObject *t = PyTuple_New(k);
    if (!t) return NULL;
    for (Py_ssize_t i = 0; i < k; i++) {
        Py_INCREF(items[i]);
        PyTuple_SET_ITEM(t, i, items[i]);
    }
    untrack_if_atomic(t);
    return t;
}

static PyObject *repeat_stretch(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ops, *outside;
    Py_ssize_t start;
    long long first, offset;
    if (!PyArg_ParseTuple(args, "O!nLLO!", &PyList_Type, &ops, &start, &first, &offset, &PyDict_Type, &outside))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ops);
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_IndexError, "start out of range");
        return NULL;
    }
    PyObject *out = PyList_New(n - start);
    if (!out) return NULL;
    PyObject *kind_alloc = PyLong_FromLong(0), *kind_free = PyLong_FromLong(1);
    if (!kind_alloc || !kind_free) goto error;
    for (Py_ssize_t i = start; i < n; i++) {
        PyObject *op = PyList_GET_ITEM(ops, i), *t = NULL;
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) < 2) goto refuse;
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(op, 0));
        PyObject *hobj = PyTuple_GET_ITEM(op, 1);
        long long h = PyLong_AsLongLong(hobj);
        if (PyErr_Occurred()) goto error;
        if (kind == 0 && PyTuple_GET_SIZE(op) == 4) {
            PyObject *nh = PyLong_FromLongLong(h + offset);
            if (!nh) goto error;
            t = op_tuple(kind_alloc, nh, PyTuple_GET_ITEM(op, 2), PyTuple_GET_ITEM(op, 3));
            Py_DECREF(nh);
        } else if (kind == 1 && PyTuple_GET_SIZE(op) == 2) {
            PyObject *nh;
            if (h >= first) {
                nh = PyLong_FromLongLong(h + offset);
                if (!nh) goto error;
            } else {
                nh = PyDict_GetItemWithError(outside, hobj); /* borrowed */
                if (!nh) {
                    if (PyErr_Occurred()) goto error;
                    goto refuse;
                }
                Py_INCREF(nh);
            }
            t = op_tuple(kind_free, nh, NULL, NULL);
            Py_DECREF(nh);
        } else {
            goto refuse;
        }
        if (!t) goto error;
        PyList_SET_ITEM(out, i - start, t);
    }
    Py_DECREF(kind_alloc);
    Py_DECREF(kind_free);
    return out;
refuse:
    Py_XDECREF(kind_alloc);
    Py_XDECREF(kind_free);
    Py_DECREF(out);
    Py_RETURN_NONE;
error:
    Py_XDECREF(kind_alloc);
    Py_XDECREF(kind_free);
    Py_DECREF(out);
    return NULL;
}

/* append (0, h, n, component) to ops and n, component, n to size, comp, delta; a new reference to h's int */
static PyObject *append_alloc(PyObject *ops, PyObject *size, PyObject *comp, PyObject *delta, long long h,
                              PyObject *n, PyObject *component, PyObject *kind_alloc) {
    PyObject *hobj = PyLong_FromLongLong(h);
    if (!hobj) return NULL;
    PyObject *t = op_tuple(kind_alloc, hobj, n, component);
    if (!t) {
        Py_DECREF(hobj);
        return NULL;
    }
    int bad = PyList_Append(ops, t) || PyList_Append(size, n) || PyList_Append(comp, component) ||
              PyList_Append(delta, n);
    Py_DECREF(t);
    if (bad) {
        Py_DECREF(hobj);
        return NULL;
    }
    return hobj;
}

static PyObject *regrow(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ops, *size, *comp, *delta, *held, *sizes, *component;
    long long h;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!UL", &PyList_Type, &ops, &PyList_Type, &size, &PyList_Type, &comp,
                          &PyList_Type, &delta, &PyList_Type, &held, &PyList_Type, &sizes, &component, &h))
        return NULL;
    if (PyList_GET_SIZE(sizes) > PyList_GET_SIZE(held)) {
        PyErr_SetString(PyExc_ValueError, "more sizes than held lists");
        return NULL;
    }
    PyObject *kind_alloc = PyLong_FromLong(0), *kind_free = PyLong_FromLong(1), *minus = PyLong_FromLong(-1);
    if (!kind_alloc || !kind_free || !minus) goto error;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sizes); i++) {
        PyObject *want = PyList_GET_ITEM(sizes, i);
        if (!PyList_Check(want)) {
            PyErr_SetString(PyExc_TypeError, "sizes must be lists");
            goto error;
        }
        Py_ssize_t k = PyList_GET_SIZE(want);
        PyObject *fresh = PyList_New(k);
        if (!fresh) goto error;
        for (Py_ssize_t j = 0; j < k; j++) {
            PyObject *x = PyList_GET_ITEM(want, j), *n;
            /* int(round(x)), as Stream.alloc: a float rounds half to even (nearbyint in the default rounding
               mode, as float.__round__), exactly below 2**53 */
            if (PyLong_CheckExact(x)) {
                n = x;
                Py_INCREF(n);
            } else if (PyFloat_CheckExact(x) && fabs(PyFloat_AS_DOUBLE(x)) < 9007199254740992.0) {
                n = PyLong_FromDouble(nearbyint(PyFloat_AS_DOUBLE(x)));
                if (!n) {
                    Py_DECREF(fresh);
                    goto error;
                }
            } else {
                PyObject *r = PyObject_CallMethod(x, "__round__", NULL);
                if (!r) {
                    Py_DECREF(fresh);
                    goto error;
                }
                n = PyNumber_Long(r);
                Py_DECREF(r);
                if (!n) {
                    Py_DECREF(fresh);
                    goto error;
                }
            }
            int positive = PyObject_RichCompareBool(n, kind_alloc, Py_GT);
            if (positive < 0) {
                Py_DECREF(n);
                Py_DECREF(fresh);
                goto error;
            }
            if (!positive) {
                Py_DECREF(n);
                Py_INCREF(minus);
                PyList_SET_ITEM(fresh, j, minus);
                continue;
            }
            PyObject *hobj = append_alloc(ops, size, comp, delta, h, n, component, kind_alloc);
            Py_DECREF(n);
            if (!hobj) {
                Py_DECREF(fresh);
                goto error;
            }
            PyList_SET_ITEM(fresh, j, hobj);
            h++;
        }
        PyObject *old = PyList_GET_ITEM(held, i);
        if (!PyList_Check(old)) {
            Py_DECREF(fresh);
            PyErr_SetString(PyExc_TypeError, "held must hold lists");
            goto error;
        }
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(old); j++) {
            PyObject *o = PyList_GET_ITEM(old, j);
            long long oh = PyLong_AsLongLong(o);
            if (oh == -1 && PyErr_Occurred()) {
                Py_DECREF(fresh);
                goto error;
            }
            if (oh < 0) continue;
            if (oh >= PyList_GET_SIZE(size)) {
                Py_DECREF(fresh);
                PyErr_SetString(PyExc_IndexError, "a held handle the stream never made");
                goto error;
            }
            PyObject *t = op_tuple(kind_free, o, NULL, NULL);
            if (!t) {
                Py_DECREF(fresh);
                goto error;
            }
            PyObject *sz = PyList_GET_ITEM(size, (Py_ssize_t)oh), *neg;
            int overflow = 0;
            long long v = PyLong_AsLongLongAndOverflow(sz, &overflow);
            if (!overflow && !(v == -1 && PyErr_Occurred()) && v > LLONG_MIN)
                neg = PyLong_FromLongLong(-v);
            else {
                PyErr_Clear();
                neg = PyNumber_Negative(sz);
            }
            int bad = !neg || PyList_Append(ops, t) || PyList_Append(delta, neg);
            Py_DECREF(t);
            Py_XDECREF(neg);
            if (bad) {
                Py_DECREF(fresh);
                goto error;
            }
        }
        if (PyList_SetItem(held, i, fresh) < 0) goto error; /* steals fresh */
    }
    Py_DECREF(kind_alloc);
    Py_DECREF(kind_free);
    Py_DECREF(minus);
    return PyLong_FromLongLong(h);
error:
    Py_XDECREF(kind_alloc);
    Py_XDECREF(kind_free);
    Py_XDECREF(minus);
    return NULL;
}

static int as_i64(PyObject *o, int64_t *v) {
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) return 1;
    if (x == -1 && PyErr_Occurred()) return -1;
    *v = x;
    return 0;
}

/* account(ops, delta, size, comp, marks, resets) -> (peak, peak_at, peak_phase, phases, components) | None */
static PyObject *account(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ops, *delta, *size, *comp, *marks, *resets;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!", &PyList_Type, &ops, &PyList_Type, &delta, &PyList_Type, &size,
                          &PyList_Type, &comp, &PyList_Type, &marks, &PyList_Type, &resets))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(delta), nmarks = PyList_GET_SIZE(marks);
    if (PyList_GET_SIZE(ops) != n || PyList_GET_SIZE(size) != PyList_GET_SIZE(comp)) Py_RETURN_NONE;
    int64_t *live = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    uint8_t *dead = NULL;
    int64_t *sums = NULL;
    PyObject *phases = NULL, *comps = NULL, *index = NULL, *result = NULL, *peak_phase = NULL;
    if (!live) return PyErr_NoMemory();
    int64_t run = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t d;
        int r = as_i64(PyList_GET_ITEM(delta, i), &d);
        if (r < 0) goto error;
        if (r > 0 || __builtin_add_overflow(run, d, &run)) goto fallback;
        live[i] = run;
    }
    /* the peak: the first maximum after the last reset (or over all events; none before any allocation) */
    Py_ssize_t r0 = 0, reset_at = -1, peak_at = -1;
    int64_t peak = -1;
    Py_ssize_t nres = PyList_GET_SIZE(resets);
    if (nres) {
        r0 = reset_at = PyLong_AsSsize_t(PyList_GET_ITEM(resets, nres - 1));
        if (r0 < 0 || r0 >= n) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "reset out of range");
            goto error;
        }
        peak = live[r0];
        peak_at = r0;
        for (Py_ssize_t i = r0 + 1; i < n; i++)
            if (live[i] > peak) {
                peak = live[i];
                peak_at = i;
            }
    } else if (PyList_GET_SIZE(size) && n) {
        peak = live[0];
        peak_at = 0;
        for (Py_ssize_t i = 1; i < n; i++)
            if (live[i] > peak) {
                peak = live[i];
                peak_at = i;
            }
    }
    /* phase peaks: each stretch from a mark to the next (the one the reset is in: its allocations after it) */
    phases = PyDict_New();
    if (!phases) goto error;
    peak_phase = PyUnicode_FromString("");
    if (!peak_phase) goto error;
    for (Py_ssize_t j = 0; j <= nmarks; j++) {
        Py_ssize_t start = j ? PyLong_AsSsize_t(PyList_GET_ITEM(marks, j - 1)) : 0;
        Py_ssize_t end = j < nmarks ? PyLong_AsSsize_t(PyList_GET_ITEM(marks, j)) : n;
        if (PyErr_Occurred()) goto error;
        if (start < 0 || end > n || start > end) {
            PyErr_SetString(PyExc_IndexError, "mark out of range");
            goto error;
        }
        if (end <= r0 && reset_at >= 0) continue;
        PyObject *name;
        if (j == 0) {
            name = peak_phase; /* "" (borrowed) */
        } else {
            PyObject *mop = PyList_GET_ITEM(ops, start);
            if (!PyTuple_Check(mop) || PyTuple_GET_SIZE(mop) < 2) {
                PyErr_SetString(PyExc_TypeError, "a phase mark is (2, name)");
                goto error;
            }
            name = PyTuple_GET_ITEM(mop, 1);
        }
        if (start <= peak_at && peak_at < end) {
            Py_INCREF(name);
            Py_SETREF(peak_phase, name);
        }
        int empty = PyUnicode_Check(name) && PyUnicode_GET_LENGTH(name) == 0;
        if (empty) continue;
        int64_t best = -1;
        if (reset_at >= 0 && start <= r0) {
            for (Py_ssize_t i = r0 + 1; i < end; i++) {
                int64_t d;
                if (as_i64(PyList_GET_ITEM(delta, i), &d)) goto error;
                if (d > 0 && live[i] > best) best = live[i];
            }
        } else {
            for (Py_ssize_t i = start; i < end; i++)
                if (live[i] > best) best = live[i];
        }
        if (best >= 0) {
            PyObject *old = PyDict_GetItemWithError(phases, name);
            if (!old && PyErr_Occurred()) goto error;
            int64_t ov = -1;
            if (old && as_i64(old, &ov)) goto error;
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
    /* components of the tensors alive at the peak, in the order they first appear */
    comps = PyDict_New();
    if (!comps) goto error;
    if (peak_at >= 0) {
        Py_ssize_t nh = 0;
        for (Py_ssize_t i = peak_at; i >= 0; i--) {
            PyObject *op = PyList_GET_ITEM(ops, i);
            if (PyTuple_Check(op) && PyTuple_GET_SIZE(op) >= 2 && PyLong_AsLong(PyTuple_GET_ITEM(op, 0)) == 0) {
                nh = PyLong_AsSsize_t(PyTuple_GET_ITEM(op, 1)) + 1;
                break;
            }
        }
        if (PyErr_Occurred()) goto error;
        if (nh > PyList_GET_SIZE(size)) {
            PyErr_SetString(PyExc_IndexError, "a handle the stream never made");
            goto error;
        }
        dead = PyMem_Calloc((size_t)(nh ? nh : 1), 1);
        sums = PyMem_Calloc((size_t)(nh ? nh : 1), sizeof(int64_t));
        index = PyDict_New();
        if (!dead || !sums || !index) {
            PyErr_NoMemory();
            goto error;
        }
        for (Py_ssize_t i = 0; i <= peak_at; i++) {
            int64_t d;
            if (as_i64(PyList_GET_ITEM(delta, i), &d)) goto error;
            if (d < 0) {
                Py_ssize_t h = PyLong_AsSsize_t(PyTuple_GET_ITEM(PyList_GET_ITEM(ops, i), 1));
                if (h < 0 && PyErr_Occurred()) goto error;
                if (h >= 0 && h < nh) dead[h] = 1;
            }
        }
        Py_ssize_t ncomp = 0;
        for (Py_ssize_t h = 0; h < nh; h++) {
            PyObject *c = PyList_GET_ITEM(comp, h), *k = PyDict_GetItemWithError(index, c);
            Py_ssize_t ci;
            if (!k) {
                if (PyErr_Occurred()) goto error;
                PyObject *v = PyLong_FromSsize_t(ncomp);
                if (!v || PyDict_SetItem(index, c, v) < 0) {
                    Py_XDECREF(v);
                    goto error;
                }
                Py_DECREF(v);
                ci = ncomp++;
            } else {
                ci = PyLong_AsSsize_t(k);
            }
            if (!dead[h]) {
                int64_t v;
                int r = as_i64(PyList_GET_ITEM(size, h), &v);
                if (r < 0) goto error;
                if (r > 0 || __builtin_add_overflow(sums[ci], v, &sums[ci])) goto fallback;
            }
        }
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(index, &pos, &key, &value)) { /* insertion order: first appearance */
            Py_ssize_t ci = PyLong_AsSsize_t(value);
            if (sums[ci]) {
                PyObject *v = PyLong_FromLongLong(sums[ci]);
                if (!v || PyDict_SetItem(comps, key, v) < 0) {
                    Py_XDECREF(v);
                    goto error;
                }
                Py_DECREF(v);
            }
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
    PyMem_Free(live);
    PyMem_Free(dead);
    PyMem_Free(sums);
    Py_XDECREF(phases);
    Py_XDECREF(comps);
    Py_XDECREF(index);
    Py_XDECREF(peak_phase);
    return result;
}

/* repeat_into(ops, size, comp, delta, start, first_handle, outside) -> offset | None: Stream.repeat whole */
static PyObject *repeat_into(PyObject *self, PyObject *args) {
    PyObject *ops, *size, *comp, *delta, *outside;
    Py_ssize_t start;
    long long first;
    if (!PyArg_ParseTuple(args, "O!O!O!O!nLO!", &PyList_Type, &ops, &PyList_Type, &size, &PyList_Type, &comp,
                          &PyList_Type, &delta, &start, &first, &PyDict_Type, &outside))
        return NULL;
    Py_ssize_t nh = PyList_GET_SIZE(size), nops = PyList_GET_SIZE(ops);
    if (first < 0 || first > nh || start < 0 || start > nops || PyList_GET_SIZE(delta) != nops ||
        PyList_GET_SIZE(comp) != nh) {
        PyErr_SetString(PyExc_ValueError, "repeat_into: a stretch the stream's lists do not hold");
        return NULL;
    }
    /* every mapped tensor exists and has the bytes of the one it stands for */
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(outside, &pos, &key, &value)) {
        Py_ssize_t a = PyLong_AsSsize_t(key), b = PyLong_AsSsize_t(value);
        if ((a == -1 || b == -1) && PyErr_Occurred()) return NULL;
        if (a < 0 || b < 0 || a >= nh || b >= nh) Py_RETURN_NONE;
        int eq = PyObject_RichCompareBool(PyList_GET_ITEM(size, a), PyList_GET_ITEM(size, b), Py_EQ);
        if (eq < 0) return NULL;
        if (!eq) Py_RETURN_NONE;
    }
    long long offset = (long long)nh - first;
    PyObject *cargs = Py_BuildValue("(OnLLO)", ops, start, first, offset, outside);
    if (!cargs) return NULL;
    PyObject *fresh = repeat_stretch(self, cargs);
    Py_DECREF(cargs);
    if (!fresh || fresh == Py_None) return fresh;
    /* append the copy and the side lists' copies (sizes and components of the new handles, the ops' deltas) */
    PyObject *sz = PyList_GetSlice(size, (Py_ssize_t)first, nh), *cp = PyList_GetSlice(comp, (Py_ssize_t)first, nh);
    PyObject *dl = PyList_GetSlice(delta, start, nops);
    int bad = !sz || !cp || !dl;
    if (!bad) {
        Py_ssize_t n = PyList_GET_SIZE(ops);
        bad = PyList_SetSlice(ops, n, n, fresh) < 0 || PyList_SetSlice(size, nh, nh, sz) < 0 ||
              PyList_SetSlice(comp, nh, nh, cp) < 0 || PyList_SetSlice(delta, nops, nops, dl) < 0;
    }
    Py_DECREF(fresh);
    Py_XDECREF(sz);
    Py_XDECREF(cp);
    Py_XDECREF(dl);
    if (bad) return NULL;
    return PyLong_FromLongLong(offset);
}

static PyMethodDef methods[] = {
    {"repeat_into", repeat_into, METH_VARARGS,
     "repeat_into(ops, size, comp, delta, start, first_handle, outside) -> offset | None: Stream.repeat"},
    {"account", account, METH_VARARGS,
     "account(ops, delta, size, comp, marks, resets) -> (peak, peak_at, peak_phase, phases, components) | None: "
     "events._account_fast's walk"},
    {"regrow", regrow, METH_VARARGS,
     "regrow(ops, size, comp, delta, held, sizes, component, next_handle) -> next_handle: Stream.regrow's loop"},
    {"repeat_stretch", repeat_stretch, METH_VARARGS,
     "repeat_stretch(ops, start, first_handle, offset, outside) -> list | None: see _events.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "memfit.estimator._events",
    "Stream building for memfit.estimator.events, compiled (see _events.c).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__events(void) {
    return PyModule_Create(&module);
}
