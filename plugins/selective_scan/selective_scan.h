/* C ABI of the CUDA selective scan (forward only).
 *
 * Kept free of TensorRT and C++ types so that the same library serves the TensorRT plugin, ctypes (tests,
 * gpu_check.py) and any other host code. Semantics are those of medmamba_edge.scan.selective_scan_ref, i.e.
 * mamba_ssm's selective_scan_fn forward with grouped B/C, no z and float32 state.
 */
#ifndef MEDMAMBA_SELECTIVE_SCAN_H
#define MEDMAMBA_SELECTIVE_SCAN_H

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MEDMAMBA_SCAN_API __declspec(dllexport)
#else
#define MEDMAMBA_SCAN_API __attribute__((visibility("default")))
#endif

/* Bumped whenever the signature or semantics of an exported function change; ctypes callers check it. */
#define MEDMAMBA_SELECTIVE_SCAN_ABI_VERSION 1

/* Element type of u, delta, B, C and y. A, D and delta_bias are always float32. */
enum medmamba_scan_dtype
{
    MEDMAMBA_SCAN_FLOAT32 = 0,
    MEDMAMBA_SCAN_FLOAT16 = 1
};

/* Largest d_state the kernels accept (d_state == 16 takes the fast path). */
#define MEDMAMBA_SCAN_MAX_D_STATE 64

/* y = selective_scan(u, delta, A, B, C, D, delta_bias) on `stream`, asynchronously.
 *
 * Shapes (all contiguous, row-major): u, delta, y (batch, channels, length); A (channels, d_state);
 * B, C (batch, groups, d_state, length); D, delta_bias (channels). `groups` must divide `channels`;
 * channel c reads B/C group c / (channels / groups). delta_softplus != 0 applies softplus (threshold 20)
 * to delta + delta_bias.
 *
 * Returns 0 (cudaSuccess) or a cudaError_t value: cudaErrorInvalidValue (1) for bad arguments, detected
 * before any CUDA call, otherwise the error of the launch itself.
 */
MEDMAMBA_SCAN_API int medmamba_selective_scan_forward(void const* u, void const* delta, float const* A,
    void const* B, void const* C, float const* D, float const* delta_bias, void* y, int batch, int channels,
    int length, int groups, int d_state, int delta_softplus, int dtype, cudaStream_t stream);

/* Short, static description of a status returned by medmamba_selective_scan_forward. */
MEDMAMBA_SCAN_API char const* medmamba_selective_scan_error_string(int status);

/* MEDMAMBA_SELECTIVE_SCAN_ABI_VERSION of the compiled library. */
MEDMAMBA_SCAN_API int medmamba_selective_scan_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* MEDMAMBA_SELECTIVE_SCAN_H */
