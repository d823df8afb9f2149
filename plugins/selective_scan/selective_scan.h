/* C ABI of the CUDA SS2DScan (forward only); the node's contract is runtime/scan_node.py.
 *
 * Kept free of TensorRT and C++ types so that the same library serves the TensorRT plugin, ctypes (tests,
 * gpu_check.py) and any other host code.
 */
#ifndef MEDMAMBA_SELECTIVE_SCAN_H
#define MEDMAMBA_SELECTIVE_SCAN_H

#include <cuda_runtime_api.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MEDMAMBA_SCAN_API __declspec(dllexport)
#else
#define MEDMAMBA_SCAN_API __attribute__((visibility("default")))
#endif

/* Bumped whenever the signature or semantics of an exported function change; ctypes callers check it.
 * 2: SS2DScan (four directions, dt_proj inside, channel-last y) replaced version 1's SelectiveScan. */
#define MEDMAMBA_SELECTIVE_SCAN_ABI_VERSION 2

/* Element type of x, x_dbl and y. dt_projs_weight, dt_projs_bias, A and Ds are always float32. */
enum medmamba_scan_dtype
{
    MEDMAMBA_SCAN_FLOAT32 = 0,
    MEDMAMBA_SCAN_FLOAT16 = 1
};

/* Largest d_state the kernels accept (d_state == 16 takes the fast path). */
#define MEDMAMBA_SCAN_MAX_D_STATE 64

/* Bytes of device workspace medmamba_ss2d_scan_forward may use for these shapes (float32 accumulators of
 * batch * channels * height * width). The kernel keeps them in shared memory when the device has room and
 * only then leaves the workspace untouched; the size does not depend on the device, so a TensorRT engine
 * built on one GPU asks for enough on any other. 0 for invalid shapes. */
MEDMAMBA_SCAN_API size_t medmamba_ss2d_scan_workspace_size(int batch, int channels, int height, int width);

/* y = SS2DScan(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds) on `stream`, asynchronously.
 *
 * Shapes (all contiguous, row-major; K = 4, L = height * width, R = dt_rank, N = d_state):
 * x (batch, channels, height, width); x_dbl (batch, K * (R + 2N), L); dt_projs_weight (K, channels, R);
 * dt_projs_bias (K, channels); A (K * channels, N); Ds (K * channels); y (batch, height, width, channels).
 * delta_softplus != 0 applies softplus (threshold 20) to the projected delta. `workspace` must hold
 * medmamba_ss2d_scan_workspace_size(...) bytes (it may be NULL when that is 0 or when workspace_bytes is 0
 * and the accumulators fit in shared memory). The result is deterministic: no atomics.
 *
 * Returns 0 (cudaSuccess) or a cudaError_t value: cudaErrorInvalidValue (1) for bad arguments, detected
 * before any CUDA call except when only the device's shared-memory size shows that a missing workspace is
 * needed; otherwise the error of the launch itself.
 */
MEDMAMBA_SCAN_API int medmamba_ss2d_scan_forward(void const* x, void const* x_dbl, float const* dt_projs_weight,
    float const* dt_projs_bias, float const* A, float const* Ds, void* y, void* workspace, size_t workspace_bytes,
    int batch, int channels, int height, int width, int dt_rank, int d_state, int delta_softplus, int dtype,
    cudaStream_t stream);

/* How medmamba_ss2d_scan_forward launches a shape on a GPU. */
typedef struct medmamba_scan_plan
{
    int block_shape;            /* index into the kernel's table of block shapes */
    int channels_per_block;     /* a block scans this many channels, all four directions */
    int chunk;                  /* time steps staged in shared memory per pass */
    int shared_bytes;           /* dynamic shared memory per block */
    int accumulators_in_shared; /* 1: y's accumulators in shared memory; 0: in the workspace */
} medmamba_scan_plan;

/* The plan medmamba_ss2d_scan_forward follows for these shapes on a GPU with sm_count multiprocessors and
 * shared_optin bytes of opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin); both 0:
 * the current device's. Returns 0 and fills *plan, or cudaErrorInvalidValue for shapes forward refuses,
 * or the error of the device query. Lets tests and gpu_check.py see which code path a shape takes. */
MEDMAMBA_SCAN_API int medmamba_ss2d_scan_plan(int batch, int channels, int height, int width, int dt_rank,
    int d_state, int sm_count, int shared_optin, medmamba_scan_plan* plan);

/* Short, static description of a status returned by medmamba_ss2d_scan_forward. */
MEDMAMBA_SCAN_API char const* medmamba_ss2d_scan_error_string(int status);

/* MEDMAMBA_SELECTIVE_SCAN_ABI_VERSION of the compiled library. */
MEDMAMBA_SCAN_API int medmamba_ss2d_scan_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* MEDMAMBA_SELECTIVE_SCAN_H */
