/*
 * medmamba_edge.runtime._scan_cpu: a torch-free, multi-threaded CPU SS2D scan for Python.
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

#define N_ARGS (MM_SCAN_INPUTS + 1) /* the inputs, then out */

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

static const char *arg_name(int i) { return i < MM_SCAN_INPUTS ? mm_scan_input_names[i] : "out"; }

static PyObject *py_ss2d_scan(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"x", "x_dbl", "dt_projs_weight", "dt_projs_bias", "A", "Ds", "out",
                             "delta_softplus", "num_threads", "isa", NULL};
    PyObject *objs[N_ARGS];
    int delta_softplus = 1;
    int num_threads = 1;
    const char *isa = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOO|piz:ss2d_scan", kwlist, &objs[0], &objs[1], &objs[2],
                                     &objs[3], &objs[4], &objs[5], &objs[6], &delta_softplus, &num_threads, &isa))
        return NULL;
    const int path = choose_path(isa);
    if (path < 0) return NULL;

    Py_buffer v[N_ARGS];
    int got = 0;
    PyObject *result = NULL;

    for (; got < N_ARGS; got++) {
        const int is_out = got == MM_SCAN_INPUTS;
        if (PyObject_GetBuffer(objs[got], &v[got], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (is_out ? PyBUF_WRITABLE : 0)) != 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "ss2d_scan: %s must be a C-contiguous float32 buffer%s (got %R)",
                         arg_name(got), is_out ? " and writable" : "", (PyObject *)Py_TYPE(objs[got]));
            goto done;
        }
        if (!is_float32_format(v[got].format) || v[got].itemsize != 4) {
            PyErr_Format(PyExc_ValueError, "ss2d_scan: %s must be float32, got buffer format '%s'", arg_name(got),
                         v[got].format ? v[got].format : "B");
            got++;
            goto done;
        }
        if ((uintptr_t)v[got].buf % sizeof(float) != 0) {
            PyErr_Format(PyExc_ValueError, "ss2d_scan: %s must be aligned to 4 bytes (a float32 view at an odd offset)",
                         arg_name(got));
            got++;
            goto done;
        }
    }

    int64_t dims[N_ARGS][8];
    int ndim[N_ARGS];
    const int64_t *dim_ptrs[MM_SCAN_INPUTS];
    for (int k = 0; k < N_ARGS; k++) {
        ndim[k] = v[k].ndim;
        buffer_dims(&v[k], dims[k]);
        if (k < MM_SCAN_INPUTS) dim_ptrs[k] = dims[k];
    }
    mm_scan_args sa = {
        .x = (const float *)v[0].buf, .x_dbl = (const float *)v[1].buf, .dt_w = (const float *)v[2].buf,
        .dt_b = (const float *)v[3].buf, .A = (const float *)v[4].buf, .Ds = (const float *)v[5].buf,
        .out = (float *)v[6].buf, .delta_softplus = delta_softplus,
    };
    char err[256];
    if (mm_scan_check_shapes(ndim, dim_ptrs, &sa, err, sizeof err) != 0) {
        PyErr_Format(PyExc_ValueError, "ss2d_scan: %s", err);
        goto done;
    }
    int64_t want[4];
    mm_scan_output_dims(&sa, want);
    const int64_t *out_dims = dims[MM_SCAN_INPUTS];
    if (ndim[MM_SCAN_INPUTS] != 4 || memcmp(out_dims, want, sizeof want) != 0) {
        char s1[128], s2[128];
        mm_scan_shape_str(4, want, s1, sizeof s1);
        mm_scan_shape_str(ndim[MM_SCAN_INPUTS], out_dims, s2, sizeof s2);
        PyErr_Format(PyExc_ValueError, "ss2d_scan: out must be (batch, height, width, channels) = %s, got %s", s1, s2);
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
    Py_INCREF(objs[MM_SCAN_INPUTS]);
    result = objs[MM_SCAN_INPUTS];

done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&v[i]);
    return result;
}

static PyMethodDef scan_methods[] = {
    {"ss2d_scan", (PyCFunction)(void (*)(void))py_ss2d_scan, METH_VARARGS | METH_KEYWORDS,
     "ss2d_scan(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds, out, delta_softplus=True, num_threads=1, isa=None)"
     " -> out\n\n"
     "SS2D's four-direction selective scan (runtime/scan_node.py, the SS2DScan contract) into `out`.\n"
     "x: (batch, channels, height, width); x_dbl: (batch, 4 * (dt_rank + 2 * d_state), height * width);\n"
     "dt_projs_weight: (4, channels, dt_rank); dt_projs_bias: (4, channels); A: (4 * channels, d_state);\n"
     "Ds: (4 * channels,); out: (batch, height, width, channels), writable, not aliasing an input.\n"
     "All float32, C-contiguous buffers. isa: one of ISAS, by default the widest this CPU supports.\n"
     "Raises ValueError on bad shapes, dtypes or an unknown isa, RuntimeError on an isa this CPU cannot run.\n"
     "Releases the GIL; uses `num_threads` pthreads."},
    {"cpu_supports", py_cpu_supports, METH_O,
     "cpu_supports(isa) -> bool: whether this CPU can run the compiled path `isa` (one of ISAS)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_scan_cpu",
    .m_doc = "Compiled CPU SS2D scan for medmamba_edge (see runtime/scan_cpu.py for the Python API).",
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
