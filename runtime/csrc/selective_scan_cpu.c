/*
 * medmamba_edge.runtime._scan_cpu: a torch-free, multi-threaded CPU selective scan for Python.
 *
 * The kernel (semantics, layout, code paths) is selective_scan_kernel.{h,c}, shared with the ONNX Runtime
 * custom-op library; this file is the Python glue: buffer-protocol inputs (no numpy C API at build time),
 * the path chosen by the caller (runtime/scan_cpu.py reads MEDMAMBA_EDGE_SCAN_ISA), and our own pthreads
 * with the GIL released while they compute.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "selective_scan_kernel.h"

static int is_float32_format(const char *fmt) {
    if (fmt == NULL) return 0; /* PyBUF_FORMAT requested, so NULL would mean unsigned bytes */
    if (fmt[0] == '@' || fmt[0] == '=') fmt++;
#if PY_LITTLE_ENDIAN
    else if (fmt[0] == '<') fmt++;
#else
    else if (fmt[0] == '>' || fmt[0] == '!') fmt++;
#endif
    return fmt[0] == 'f' && fmt[1] == '\0';
}

/* The first 8 dims of a buffer as int64, for the kernel's shape checks and messages. */
static void buffer_dims(const Py_buffer *v, int64_t dims[8]) {
    for (int i = 0; i < v->ndim && i < 8; i++) dims[i] = (int64_t)v->shape[i];
}

static const char *const ARG_NAMES[8] = {"u", "delta", "A", "B", "C", "D", "delta_bias", "out"};

/* The index of the path called `name`; -1 with ValueError set if this build has none. */
static int find_path(const char *name) {
    const int i = mm_scan_find_path(name);
    if (i < 0) {
        char names[64];
        mm_scan_path_names(names, sizeof names);
        PyErr_Format(PyExc_ValueError, "unknown scan path '%s'; this build has %s", name, names);
    }
    return i;
}

/* The path a call runs: `name`, refused (RuntimeError) if this CPU cannot run it, or by default the
 * widest this CPU supports.  -1 with an exception set on refusal. */
static int choose_path(const char *name) {
    if (name == NULL) return mm_scan_default_path();
    const int i = find_path(name);
    if (i < 0) return -1;
    if (!mm_scan_path_supported(i)) {
        PyErr_Format(PyExc_RuntimeError, "this CPU cannot run the '%s' scan path", name);
        return -1;
    }
    return i;
}

static PyObject *py_cpu_supports(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    const int i = find_path(name);
    if (i < 0) return NULL;
    return PyBool_FromLong(mm_scan_path_supported(i));
}

static PyObject *py_selective_scan(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"u", "delta", "A", "B", "C", "D", "delta_bias", "out",
                             "delta_softplus", "num_threads", "isa", NULL};
    PyObject *objs[8];
    int delta_softplus = 1;
    int num_threads = 1;
    const char *isa = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOO|piz:selective_scan", kwlist, &objs[0], &objs[1],
                                     &objs[2], &objs[3], &objs[4], &objs[5], &objs[6], &objs[7],
                                     &delta_softplus, &num_threads, &isa))
        return NULL;
    const int path = choose_path(isa);
    if (path < 0) return NULL;

    Py_buffer v[8];
    int got = 0;
    PyObject *result = NULL;

    for (; got < 8; got++) {
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT;
        if (got == 7) flags |= PyBUF_WRITABLE;
        if (PyObject_GetBuffer(objs[got], &v[got], flags) != 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError,
                         "selective_scan: %s must be a C-contiguous float32 buffer%s (got %R)", ARG_NAMES[got],
                         got == 7 ? " and writable" : "", (PyObject *)Py_TYPE(objs[got]));
            goto done;
        }
        if (!is_float32_format(v[got].format) || v[got].itemsize != 4) {
            PyErr_Format(PyExc_ValueError, "selective_scan: %s must be float32, got buffer format '%s'",
                         ARG_NAMES[got], v[got].format ? v[got].format : "B");
            got++;
            goto done;
        }
    }

    int64_t dims[8][8];
    int ndim[8];
    const int64_t *dim_ptrs[MM_SCAN_INPUTS];
    for (int k = 0; k < 8; k++) {
        ndim[k] = v[k].ndim;
        buffer_dims(&v[k], dims[k]);
        if (k < MM_SCAN_INPUTS) dim_ptrs[k] = dims[k];
    }
    mm_scan_args sa = {
        .u = (const float *)v[0].buf, .delta = (const float *)v[1].buf, .A = (const float *)v[2].buf,
        .B = (const float *)v[3].buf, .C = (const float *)v[4].buf, .D = (const float *)v[5].buf,
        .delta_bias = (const float *)v[6].buf, .out = (float *)v[7].buf, .delta_softplus = delta_softplus,
    };
    char err[256];
    if (mm_scan_check_shapes(ndim, dim_ptrs, &sa, err, sizeof err) != 0) {
        PyErr_Format(PyExc_ValueError, "selective_scan: %s", err);
        goto done;
    }
    if (ndim[7] != 3 || dims[7][0] != dims[0][0] || dims[7][1] != dims[0][1] || dims[7][2] != dims[0][2]) {
        char s1[128], s2[128];
        mm_scan_shape_str(ndim[0], dims[0], s1, sizeof s1);
        mm_scan_shape_str(ndim[7], dims[7], s2, sizeof s2);
        PyErr_Format(PyExc_ValueError, "selective_scan: out must have u's shape %s, got %s", s1, s2);
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mm_scan_run_pthreads(&sa, path, num_threads);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_NoMemory();
        goto done;
    }
    Py_INCREF(objs[7]);
    result = objs[7];

done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&v[i]);
    return result;
}

static PyMethodDef scan_methods[] = {
    {"selective_scan", (PyCFunction)(void (*)(void))py_selective_scan, METH_VARARGS | METH_KEYWORDS,
     "selective_scan(u, delta, A, B, C, D, delta_bias, out, delta_softplus=True, num_threads=1) -> out\n\n"
     "Selective scan (MedMamba/mamba_ssm semantics, grouped B/C, float32 state) into `out`.\n"
     "u, delta, out: (batch, channels, length); A: (channels, d_state); B, C: (batch, groups, d_state, length);\n"
     "D, delta_bias: (channels,). All float32, C-contiguous buffers; `out` writable and not aliasing B or C.\n"
     "isa: one of ISAS, by default the widest this CPU supports.\n"
     "Raises ValueError on bad shapes, dtypes or an unknown isa, RuntimeError on an isa this CPU cannot run.\n"
     "Releases the GIL; uses `num_threads` pthreads."},
    {"cpu_supports", py_cpu_supports, METH_O,
     "cpu_supports(isa) -> bool: whether this CPU can run the compiled path `isa` (one of ISAS)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_scan_cpu",
    .m_doc = "Compiled CPU selective scan for medmamba_edge (see runtime/scan_cpu.py for the Python API).",
    .m_size = -1,
    .m_methods = scan_methods,
};

PyMODINIT_FUNC PyInit__scan_cpu(void) {
    PyObject *m = PyModule_Create(&scan_module);
    if (m == NULL) return NULL;
    PyObject *isas = PyTuple_New(mm_scan_path_count());
    if (isas == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < mm_scan_path_count(); i++) {
        PyObject *name = PyUnicode_FromString(mm_scan_path_name(i));
        if (name == NULL) {
            Py_DECREF(isas);
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SET_ITEM(isas, i, name);
    }
    if (PyModule_AddObject(m, "ISAS", isas) < 0) {
        Py_DECREF(isas);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "BLOCK_CHANNELS", MM_SCAN_BLOCK_CHANNELS) < 0 || PyModule_AddIntConstant(m, "TILE_STEPS", MM_SCAN_TILE_STEPS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
