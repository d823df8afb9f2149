/*
 * The CPU selective scan shared by the Python extension (selective_scan_cpu.c) and the ONNX Runtime custom-op
 * library (ort_custom_ops.c): one kernel source, compiled into each.  No Python, no ONNX Runtime here.
 *
 * Semantics: runtime/scan_node.py (the SS2DScan contract) and medmamba_edge/scan.py (ss2d_scan_ref).
 */
#ifndef MEDMAMBA_EDGE_SELECTIVE_SCAN_KERNEL_H
#define MEDMAMBA_EDGE_SELECTIVE_SCAN_KERNEL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Channels per vector block (one work item) and time steps per tile. */
#define MM_SCAN_BLOCK_CHANNELS 16
#define MM_SCAN_TILE_STEPS 64
/* SS2D's directions: row-major, column-major, and both reversed. */
#define MM_SCAN_DIRECTIONS 4

/* float32, C-contiguous (K = 4 directions, L = height * width, P = dt_rank + 2 * d_state):
 *   x (batch, channels, height, width); x_dbl (batch, K * P, L); dt_w (K, channels, dt_rank); dt_b (K, channels);
 *   A (K * channels, d_state); Ds (K * channels); out (batch, height, width, channels), not aliasing any input. */
typedef struct {
    const float *x, *x_dbl, *dt_w, *dt_b, *A, *Ds;
    float *out;
    ptrdiff_t batch, channels, height, width, dt_rank, d_state;
    int delta_softplus;
} mm_scan_args;

/* The inputs in their contract order, for messages (runtime/scan_node.py INPUT_NAMES). */
#define MM_SCAN_INPUTS 6
extern const char *const mm_scan_input_names[MM_SCAN_INPUTS];

/* Checks the inputs' shapes (ndim[i], dims[i] for x, x_dbl, dt_w, dt_b, A, Ds) and sets a's sizes.
 * Returns 0, or -1 with a one-line message (no prefix) in err. */
int mm_scan_check_shapes(const int ndim[MM_SCAN_INPUTS], const int64_t *const dims[MM_SCAN_INPUTS], mm_scan_args *a,
                         char *err, size_t err_size);

/* The output's shape (batch, height, width, channels) for checked args. */
void mm_scan_output_dims(const mm_scan_args *a, int64_t dims[4]);

/* "(2, 3, 4)" into buf; at most the first 8 dims are shown. */
void mm_scan_shape_str(int ndim, const int64_t *dims, char *buf, size_t n);

/* Compiled code paths (x86-64 with gcc >= 11 or clang >= 14: "avx512", "avx2", "baseline"; elsewhere "baseline"),
 * widest first. */
int mm_scan_path_count(void);
const char *mm_scan_path_name(int path);
int mm_scan_path_supported(int path); /* whether this CPU and OS can run it */
int mm_scan_find_path(const char *name); /* -1 if this build has none of that name */
int mm_scan_default_path(void);         /* the widest this CPU supports */
void mm_scan_path_names(char *buf, size_t n); /* "avx512, avx2, baseline" */

/* The path $MEDMAMBA_EDGE_SCAN_ISA forces (runtime/scan_cpu.py isa() is its Python twin for the extension), or the
 * default when unset.  -1 with a one-line message in err if it names no path of this build or one this CPU lacks. */
#define MM_SCAN_ISA_ENV "MEDMAMBA_EDGE_SCAN_ISA"
int mm_scan_path_from_env(char *err, size_t err_size);

/* One call split into work items that workers take from an atomic counter: any number of threads, from any thread
 * pool, share it dynamically, and results do not depend on who runs what.  One item per (batch, block of <= 16
 * channels) in all four directions, so it alone writes their outputs and the sum over directions has a fixed
 * order. */
typedef struct {
    const mm_scan_args *args;
    int path;
    ptrdiff_t blocks_per_batch, total;
    atomic_llong next;
    atomic_int failed;
} mm_scan_job;

void mm_scan_job_init(mm_scan_job *job, const mm_scan_args *a, int path);
/* Take and run items until none are left.  Safe to call from many threads at once, and more often than there are
 * threads (total): a call that finds no item left returns at once. */
void mm_scan_work(mm_scan_job *job);
/* After every mm_scan_work call has returned: 0, or -1 if scratch memory could not be had and items were left. */
int mm_scan_job_status(mm_scan_job *job);

/* The whole call on num_threads threads: the caller's and num_threads - 1 pthreads.  0, or -1 out of memory. */
int mm_scan_run_pthreads(const mm_scan_args *a, int path, int num_threads);

#endif
