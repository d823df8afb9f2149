/*
 * The CPU selective scan shared by the Python extension (selective_scan_cpu.c) and the ONNX Runtime custom-op
 * library (ort_custom_ops.c): one kernel source, compiled into each.  No Python, no ONNX Runtime here.
 *
 * Semantics: runtime/scan_node.py (the SelectiveScan contract) and medmamba_edge/scan.py (selective_scan_ref).
 */
#ifndef MEDMAMBA_EDGE_SELECTIVE_SCAN_KERNEL_H
#define MEDMAMBA_EDGE_SELECTIVE_SCAN_KERNEL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Channels per vector block (one work item at most) and time steps per tile. */
#define MM_SCAN_BLOCK_CHANNELS 16
#define MM_SCAN_TILE_STEPS 64

/* float32, C-contiguous: u, delta, out (batch, channels, length); A (channels, d_state);
 * B, C (batch, groups, d_state, length); D, delta_bias (channels,).  out must not alias B or C. */
typedef struct {
    const float *u, *delta, *A, *B, *C, *D, *delta_bias;
    float *out;
    ptrdiff_t batch, channels, length, groups, d_state;
    int delta_softplus;
} mm_scan_args;

/* The inputs in their contract order, for messages (runtime/scan_node.py INPUT_NAMES). */
#define MM_SCAN_INPUTS 7
extern const char *const mm_scan_input_names[MM_SCAN_INPUTS];

/* Checks the inputs' shapes (ndim[i], dims[i] for u, delta, A, B, C, D, delta_bias) and sets a's sizes.
 * Returns 0, or -1 with a one-line message (no prefix) in err. */
int mm_scan_check_shapes(const int ndim[MM_SCAN_INPUTS], const int64_t *const dims[MM_SCAN_INPUTS], mm_scan_args *a,
                         char *err, size_t err_size);

/* "(2, 3, 4)" into buf; at most the first 8 dims are shown. */
void mm_scan_shape_str(int ndim, const int64_t *dims, char *buf, size_t n);

/* Compiled code paths (x86-64 with gcc >= 12: "avx512", "avx2", "baseline"; elsewhere "baseline"), widest first. */
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

/* One scan split into work items (batch, group, block of <= 16 channels) that workers take from an atomic counter,
 * so any number of threads, from any thread pool, share it dynamically; results do not depend on who runs what. */
typedef struct {
    const mm_scan_args *args;
    int path;
    ptrdiff_t blocks_per_group, blocks_per_batch, total;
    atomic_llong next;
    atomic_int failed;
} mm_scan_job;

void mm_scan_job_init(mm_scan_job *job, const mm_scan_args *a, int path);
/* Takes and runs items until none are left.  Safe to call from many threads at once, and more often than there are
 * threads: a call that finds no item left returns at once. */
void mm_scan_work(mm_scan_job *job);
/* After every mm_scan_work call has returned: 0, or -1 if scratch memory could not be had and items were left. */
int mm_scan_job_status(mm_scan_job *job);

/* The whole scan on num_threads threads: the caller's and num_threads - 1 pthreads.  0, or -1 out of memory. */
int mm_scan_run_pthreads(const mm_scan_args *a, int path, int num_threads);

#endif
