// SS2DScan forward (contract: runtime/scan_node.py) for MedMamba: four directional selective scans with
// dt_proj inside, summed into a channel-last y.
//
// Work decomposition. A thread block owns one batch element, kG consecutive channels and all four directions,
// so the four directions can be summed in a fixed order without atomics (deterministic) and without a second
// kernel over per-direction partials (on a Jetson, writing and re-reading four float32 copies of y would cost
// about as much DRAM time as the scan itself). Thread (k, r, lane) runs the recurrences of direction k,
// channel d0 + r and the states n = s * kLanes + lane, sequentially in time with float32 state in registers:
// no time-parallel scan, so exp(delta * A) (the special-function unit is this kernel's bound) and each FMA
// are issued once per (t, n). The sequence is walked in chunks of kChunk steps:
//   1. stage: x's kG channel rows and x_dbl's dt_low, B and C rows of every direction are gathered into
//      shared memory at p = seq_k(t), so no transposed or flipped copy exists anywhere; the B/C rows are read
//      by all kG channels of the block (x_dbl traffic shrinks by kG);
//   2. delta = dt_projs_bias + dt_projs_weight . dt_low (then softplus), once per (k, channel, t);
//   3. scan: each thread sums C * h over its own states per step;
//   4. the per-lane sums go through shared memory (over the dead B/C rows) and are added, direction by
//      direction, into a float32 accumulator of kG x L positions; Ds * x joins with direction 0.
// The accumulator lives in shared memory when the device has room for it (medmamba_ss2d_scan_plan says
// where), else in the caller's workspace, private to the block and L2-resident. Finally the block writes
// its kG channels of y (b, H, W, D). d_state == 16 (MedMamba, Mamba defaults) is compiled with a static
// d_state; other values up to MEDMAMBA_SCAN_MAX_D_STATE take a generic instantiation.

#include "selective_scan.h"

#include <cuda_fp16.h>

#include <atomic>
#include <climits>
#include <cstdint>

namespace
{

constexpr int kDirections = 4;
constexpr float kLog2e = 1.4426950408889634f;
// Same threshold as medmamba_edge.runtime.scan_node.SOFTPLUS_THRESHOLD (and torch / mamba_ssm).
constexpr float kSoftplusThreshold = 20.0f;
// Dynamic shared memory every supported GPU grants without cudaFuncSetAttribute.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

struct ScanParams
{
    void const* x;
    void const* xDbl;
    float const* dtWeight;
    float const* dtBias;
    float const* A;
    float const* Ds;
    void* y;
    float* workspace;
    int batch;
    int channels;
    int height;
    int width;
    int dtRank;
    int dState;
    int deltaSoftplus;
    int accInShared;
};

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}
__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

// seq_k(t) of runtime/scan_node.py: k = 1, 3 column-major, k = 2, 3 reversed.
__host__ __device__ __forceinline__ int scanPosition(int k, int t, int height, int width, int length)
{
    int const s = (k & 2) ? length - 1 - t : t;
    return (k & 1) ? (s % height) * width + s / height : s;
}

// Row stride of a staged chunk: a multiple of 4 floats keeps float4 reads aligned, and the 4 extra words
// put consecutive rows 4 banks apart, so the 8 lanes of a quarter-warp reading 8 rows hit distinct banks.
__host__ __device__ constexpr int chunkStride(int chunk)
{
    return chunk + 4;
}

// The block's sum of Ds over the four directions, one float per channel, heads the dynamic shared memory
// (rounded up to 4 floats so the staged rows after it stay float4-aligned). No static shared memory: the
// dynamic bytes a launch asks for are then all it uses, and the whole opt-in is available to them.
__host__ __device__ constexpr int dsumFloats(int g)
{
    return (g + 3) / 4 * 4;
}

// Rows of one direction's staged chunk: kG x rows, kG delta rows, R dt_low rows, then N B rows and N C rows,
// which the kG * kLanes per-lane y sums overwrite once the scan has read them.
__host__ __device__ __forceinline__ int directionRows(int g, int lanes, int dtRank, int dState)
{
    return 2 * g + dtRank + (2 * dState > g * lanes ? 2 * dState : g * lanes);
}

// An odd stride spreads the final channel-interleaved reads of the accumulator over all banks.
__host__ __device__ __forceinline__ int sharedAccStride(int length)
{
    return length | 1;
}

template <typename T, int kN, int kLanes, int kG, int kChunk>
__global__ void __launch_bounds__(kDirections* kG* kLanes) ss2dScanKernel(ScanParams const p)
{
    constexpr int kThreads = kDirections * kG * kLanes;
    constexpr int kMaxN = kN > 0 ? kN : MEDMAMBA_SCAN_MAX_D_STATE;
    constexpr int kStates = (kMaxN + kLanes - 1) / kLanes;
    constexpr int kStride = chunkStride(kChunk);
    static_assert(kChunk % 4 == 0, "chunks are read as float4");
    static_assert(kLanes <= 32 && 32 % kLanes == 0, "a (direction, channel) stays inside one warp");

    extern __shared__ float4 sDynamic[];
    float* const sDsum = reinterpret_cast<float*>(sDynamic);
    float* const smem = sDsum + dsumFloats(kG);

    int const N = kN > 0 ? kN : p.dState;
    int const R = p.dtRank;
    int const D = p.channels;
    int const H = p.height;
    int const W = p.width;
    int const L = H * W;
    int const rowsPerDirection = directionRows(kG, kLanes, R, N);
    int const xDblRows = R + 2 * N;
    int const b = blockIdx.y;
    int const d0 = blockIdx.x * kG;
    int const nValid = min(kG, D - d0);

    float* acc;
    int accStride;
    if (p.accInShared)
    {
        acc = smem + kDirections * rowsPerDirection * kStride;
        accStride = sharedAccStride(L);
    }
    else
    {
        acc = p.workspace + (static_cast<size_t>(b) * D + d0) * L;
        accStride = L;
    }

    T const* x = static_cast<T const*>(p.x) + static_cast<size_t>(b) * D * L;
    T const* xDbl = static_cast<T const*>(p.xDbl) + static_cast<size_t>(b) * kDirections * xDblRows * L;

    int const tid = threadIdx.x;
    int const lane = tid % kLanes;
    int const r = (tid / kLanes) % kG;
    int const k = tid / (kLanes * kG);
    bool const channelValid = r < nValid;

    float A2[kStates]; // A * log2(e): exp(delta * A) == exp2(delta * A2)
    float h[kStates];
#pragma unroll
    for (int s = 0; s < kStates; ++s)
    {
        int const n = s * kLanes + lane;
        A2[s] = (channelValid && n < N) ? p.A[(static_cast<size_t>(k) * D + d0 + r) * N + n] * kLog2e : 0.0f;
        h[s] = 0.0f;
    }
    if (tid < kG)
    {
        float sum = 0.0f;
        if (tid < nValid)
            for (int kk = 0; kk < kDirections; ++kk)
                sum += p.Ds[kk * D + d0 + tid];
        sDsum[tid] = sum;
    }
    for (int e = tid; e < nValid * L; e += kThreads)
        acc[(e / L) * accStride + e % L] = 0.0f;

    // Rows staged from global memory per direction: kG of x, then all of x_dbl's (dt_low, B, C).
    int const loadRows = kG + xDblRows;
    for (int t0 = 0; t0 < L; t0 += kChunk)
    {
        // 1. Gather; consecutive threads take consecutive t, so directions 0 and 2 read contiguous runs.
        for (int e = tid; e < kDirections * loadRows * kChunk; e += kThreads)
        {
            int const i = e % kChunk;
            int const row = (e / kChunk) % loadRows;
            int const kk = e / (kChunk * loadRows);
            int const t = t0 + i;
            float v = 0.0f; // padding (past L, past the last channel) scans as delta = 0: h unchanged
            if (t < L)
            {
                int const pos = scanPosition(kk, t, H, W, L);
                if (row < kG)
                {
                    if (row < nValid)
                        v = toFloat(x[static_cast<size_t>(d0 + row) * L + pos]);
                }
                else
                {
                    v = toFloat(xDbl[static_cast<size_t>(kk * xDblRows + row - kG) * L + pos]);
                }
            }
            int const sharedRow = row < kG ? row : row + kG; // the delta rows sit between x and dt_low
            smem[(kk * rowsPerDirection + sharedRow) * kStride + i] = v;
        }
        __syncthreads();

        // 2. delta, once per (direction, channel, t) rather than once per state.
        for (int e = tid; e < kDirections * kG * kChunk; e += kThreads)
        {
            int const i = e % kChunk;
            int const rr = (e / kChunk) % kG;
            int const kk = e / (kChunk * kG);
            float v = 0.0f;
            if (rr < nValid && t0 + i < L)
            {
                int const c = kk * D + d0 + rr;
                float const* dtLow = smem + (kk * rowsPerDirection + 2 * kG) * kStride + i;
                v = p.dtBias[c];
                for (int j = 0; j < R; ++j)
                    v += p.dtWeight[static_cast<size_t>(c) * R + j] * dtLow[j * kStride];
                if (p.deltaSoftplus && v <= kSoftplusThreshold)
                    v = log1pf(expf(v));
            }
            smem[(kk * rowsPerDirection + kG + rr) * kStride + i] = v;
        }
        __syncthreads();

        // 3. Scan this thread's states through the chunk.
        float* const region = smem + k * rowsPerDirection * kStride;
        float const* const uRow = region + r * kStride;
        float const* const deltaRow = region + (kG + r) * kStride;
        float const* const bRows = region + (2 * kG + R) * kStride;
        float const* const cRows = bRows + N * kStride;
        float ySum[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk; i += 4)
        {
            float4 const d4 = *reinterpret_cast<float4 const*>(deltaRow + i);
            float4 const u4 = *reinterpret_cast<float4 const*>(uRow + i);
            float const dt[4] = {d4.x, d4.y, d4.z, d4.w};
            float const du[4] = {d4.x * u4.x, d4.y * u4.y, d4.z * u4.z, d4.w * u4.w};
#pragma unroll
            for (int q = 0; q < 4; ++q)
                ySum[i + q] = 0.0f;
#pragma unroll
            for (int s = 0; s < kStates; ++s)
            {
                int const n = s * kLanes + lane;
                if (kLanes * kStates == kN || n < N) // static for d_state = 16
                {
                    float4 const b4 = *reinterpret_cast<float4 const*>(bRows + n * kStride + i);
                    float4 const c4 = *reinterpret_cast<float4 const*>(cRows + n * kStride + i);
                    float const bv[4] = {b4.x, b4.y, b4.z, b4.w};
                    float const cv[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
                    for (int q = 0; q < 4; ++q)
                    {
                        h[s] = exp2f(dt[q] * A2[s]) * h[s] + du[q] * bv[q];
                        ySum[i + q] += cv[q] * h[s];
                    }
                }
            }
        }
        __syncthreads(); // every thread is done with B/C: they now take the per-lane sums
        float* const laneRow = region + (2 * kG + R + r * kLanes + lane) * kStride;
#pragma unroll
        for (int i = 0; i < kChunk; i += 4)
            *reinterpret_cast<float4*>(laneRow + i) = make_float4(ySum[i], ySum[i + 1], ySum[i + 2], ySum[i + 3]);
        __syncthreads();

        // 4. One direction per pass: two directions can meet at a position within a chunk, and a fixed order
        // of the four additions keeps y bitwise reproducible.
        for (int kk = 0; kk < kDirections; ++kk)
        {
            float const* const dir = smem + kk * rowsPerDirection * kStride;
            for (int e = tid; e < kG * kChunk; e += kThreads)
            {
                int const i = e % kChunk;
                int const rr = e / kChunk;
                int const t = t0 + i;
                if (rr < nValid && t < L)
                {
                    float v = 0.0f;
                    for (int l = 0; l < kLanes; ++l)
                        v += dir[(2 * kG + R + rr * kLanes + l) * kStride + i];
                    if (kk == 0) // seq_0(t) = t: direction 0's staged x row is x at this position
                        v += sDsum[rr] * dir[rr * kStride + i];
                    acc[rr * accStride + scanPosition(kk, t, H, W, L)] += v;
                }
            }
            __syncthreads(); // also frees the chunk rows for the next gather
        }
    }

    // Channel-last y: consecutive threads write the block's kG consecutive channels of one position.
    T* const y = static_cast<T*>(p.y) + static_cast<size_t>(b) * L * D + d0;
    for (int e = tid; e < kG * L; e += kThreads)
    {
        int const rr = e % kG;
        int const pos = e / kG;
        if (rr < nValid)
            y[static_cast<size_t>(pos) * D + rr] = fromFloat<T>(acc[rr * accStride + pos]);
    }
}

struct DeviceInfo
{
    int device;
    int smCount;
    int sharedOptin; // largest dynamic shared memory a block may opt in to
};

constexpr int kCachedDevices = 64;

cudaError_t deviceInfo(DeviceInfo* info)
{
    static std::atomic<int> smCache[kCachedDevices];
    static std::atomic<int> sharedCache[kCachedDevices];
    cudaError_t err = cudaGetDevice(&info->device);
    if (err != cudaSuccess)
        return err;
    int const device = info->device;
    bool const cacheable = device >= 0 && device < kCachedDevices;
    if (cacheable)
    {
        info->smCount = smCache[device].load(std::memory_order_relaxed);
        info->sharedOptin = sharedCache[device].load(std::memory_order_relaxed);
        if (info->smCount > 0 && info->sharedOptin > 0)
            return cudaSuccess;
    }
    err = cudaDeviceGetAttribute(&info->smCount, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess)
        err = cudaDeviceGetAttribute(&info->sharedOptin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err == cudaSuccess && cacheable)
    {
        smCache[device].store(info->smCount, std::memory_order_relaxed);
        sharedCache[device].store(info->sharedOptin, std::memory_order_relaxed);
    }
    return err;
}

// Block shapes (all 128 threads): many channels per block divide the x_dbl re-reads (B/C rows are shared by
// the block's channels) and leave each thread several independent state chains; few channels per block give
// the GPU enough blocks when there is little work (MedMamba-T stage 1 at batch 1: 96 channels). A first
// choice by block count, pending tune_block_shapes.py on real GPUs (H200 and Jetson Orin). d_state != 16
// takes the generic shape with the longest chunk whose staged rows fit: a large d_state's B/C rows do not
// fit 32 steps in 64 KiB (sm_75).
struct BlockShape
{
    int dState; // 0: generic, any d_state up to MEDMAMBA_SCAN_MAX_D_STATE
    int lanes;
    int channels;
    int chunk;
};
constexpr BlockShape kShapes[] = {
    {16, 4, 8, 32}, {16, 8, 4, 32}, {16, 16, 2, 32}, {0, 32, 1, 32}, {0, 32, 1, 16}, {0, 32, 1, 8}};
constexpr int kShapeCount = sizeof(kShapes) / sizeof(kShapes[0]);
constexpr int kFirstGenericShape = 3;

// Dynamic shared memory `shape` needs for these sizes, with y's accumulators in it when they fit (else they
// go to the workspace); 0 when not even the staged rows fit.
size_t sharedBytes(BlockShape const& shape, int dtRank, int dState, int length, int sharedOptin, bool* accInShared)
{
    size_t const staging = sizeof(float)
        * (dsumFloats(shape.channels)
            + static_cast<size_t>(kDirections) * chunkStride(shape.chunk)
                * directionRows(shape.channels, shape.lanes, dtRank, dState));
    size_t const accumulators = sizeof(float) * shape.channels * static_cast<size_t>(sharedAccStride(length));
    *accInShared = staging + accumulators <= static_cast<size_t>(sharedOptin);
    if (*accInShared)
        return staging + accumulators;
    return staging <= static_cast<size_t>(sharedOptin) ? staging : 0;
}

cudaError_t planLaunch(int batch, int channels, int height, int width, int dtRank, int dState, int smCount,
    int sharedOptin, medmamba_scan_plan* plan)
{
    int const length = height * width;
    bool accInShared = false;
    int shape = 0;
    if (dState != 16)
    {
        shape = kFirstGenericShape;
        while (shape + 1 < kShapeCount && sharedBytes(kShapes[shape], dtRank, dState, length, sharedOptin, &accInShared) == 0)
            ++shape;
    }
    else
    {
        auto blocks = [&](long long g) { return batch * ((channels + g - 1) / g); };
        shape = blocks(8) >= 2LL * smCount ? 0 : blocks(4) >= smCount ? 1 : 2;
    }
    size_t const shared = sharedBytes(kShapes[shape], dtRank, dState, length, sharedOptin, &accInShared);
    if (shared == 0)
        return cudaErrorInvalidValue; // only an absurd dt_rank gets here
    *plan = medmamba_scan_plan{
        shape, kShapes[shape].channels, kShapes[shape].chunk, static_cast<int>(shared), accInShared ? 1 : 0};
    return cudaSuccess;
}

template <typename T, int kN, int kLanes, int kG, int kChunk>
cudaError_t launch(ScanParams p, DeviceInfo const& device, size_t workspaceBytes, cudaStream_t stream)
{
    bool accInShared = false;
    size_t const shared = sharedBytes(BlockShape{kN, kLanes, kG, kChunk}, p.dtRank, p.dState, p.height * p.width,
        device.sharedOptin, &accInShared);
    if (shared == 0)
        return cudaErrorInvalidValue;
    p.accInShared = accInShared;
    if (!p.accInShared
        && (p.workspace == nullptr
            || workspaceBytes < medmamba_ss2d_scan_workspace_size(p.batch, p.channels, p.height, p.width)))
        return cudaErrorInvalidValue;
    auto kernel = ss2dScanKernel<T, kN, kLanes, kG, kChunk>;
    if (shared > kDefaultSharedBytes)
    {
        // Once per kernel and device, and to all the device allows: a per-launch value would race between host
        // threads launching this kernel with other shapes (two TensorRT execution contexts, Triton instances).
        static std::atomic<bool> optedIn[kCachedDevices];
        bool const cacheable = device.device >= 0 && device.device < kCachedDevices;
        if (!cacheable || !optedIn[device.device].load(std::memory_order_acquire))
        {
            cudaError_t const err
                = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, device.sharedOptin);
            if (err != cudaSuccess)
                return err;
            if (cacheable)
                optedIn[device.device].store(true, std::memory_order_release);
        }
    }
    dim3 const grid((p.channels + kG - 1) / kG, p.batch);
    kernel<<<grid, kDirections * kG * kLanes, shared, stream>>>(p);
    return cudaGetLastError();
}

// launch() with the block shape kShapes[shape].
template <typename T, int kShape = 0>
cudaError_t launchShape(int shape, ScanParams const& p, DeviceInfo const& device, size_t workspaceBytes,
    cudaStream_t stream)
{
    if constexpr (kShape + 1 < kShapeCount)
    {
        if (shape != kShape)
            return launchShape<T, kShape + 1>(shape, p, device, workspaceBytes, stream);
    }
    constexpr BlockShape s = kShapes[kShape];
    return launch<T, s.dState, s.lanes, s.channels, s.chunk>(p, device, workspaceBytes, stream);
}

template <typename T>
cudaError_t dispatch(ScanParams const& p, size_t workspaceBytes, cudaStream_t stream)
{
    DeviceInfo device{};
    cudaError_t err = deviceInfo(&device);
    if (err != cudaSuccess)
        return err;
    medmamba_scan_plan plan{};
    err = planLaunch(p.batch, p.channels, p.height, p.width, p.dtRank, p.dState, device.smCount, device.sharedOptin,
        &plan);
    if (err != cudaSuccess)
        return err;
    return launchShape<T>(plan.block_shape, p, device, workspaceBytes, stream);
}

bool validShape(int batch, int channels, int height, int width)
{
    // grid.y holds the batch (at most 65535); index arithmetic within one image is int.
    return batch >= 0 && batch <= 65535 && channels > 0 && height >= 0 && width >= 0
        && static_cast<long long>(height) * width * (channels > 8 ? channels : 8) <= INT_MAX;
}

bool validArguments(int batch, int channels, int height, int width, int dtRank, int dState)
{
    return validShape(batch, channels, height, width) && dtRank > 0 && dState > 0
        && dState <= MEDMAMBA_SCAN_MAX_D_STATE
        && kDirections * (static_cast<long long>(dtRank) + 2 * dState) * height * width <= INT_MAX;
}

} // namespace

extern "C" size_t medmamba_ss2d_scan_workspace_size(int batch, int channels, int height, int width)
{
    if (!validShape(batch, channels, height, width))
        return 0;
    return sizeof(float) * static_cast<size_t>(batch) * channels * height * width;
}

extern "C" int medmamba_ss2d_scan_forward(void const* x, void const* x_dbl, float const* dt_projs_weight,
    float const* dt_projs_bias, float const* A, float const* Ds, void* y, void* workspace, size_t workspace_bytes,
    int batch, int channels, int height, int width, int dt_rank, int d_state, int delta_softplus, int dtype,
    cudaStream_t stream)
{
    if (!x || !x_dbl || !dt_projs_weight || !dt_projs_bias || !A || !Ds || !y)
        return cudaErrorInvalidValue;
    if (!validArguments(batch, channels, height, width, dt_rank, d_state)
        || (dtype != MEDMAMBA_SCAN_FLOAT32 && dtype != MEDMAMBA_SCAN_FLOAT16))
        return cudaErrorInvalidValue;
    if (batch == 0 || height == 0 || width == 0)
        return cudaSuccess;
    ScanParams const p{x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds, y, static_cast<float*>(workspace), batch,
        channels, height, width, dt_rank, d_state, delta_softplus != 0, 0};
    return dtype == MEDMAMBA_SCAN_FLOAT16 ? dispatch<__half>(p, workspace_bytes, stream)
                                          : dispatch<float>(p, workspace_bytes, stream);
}

extern "C" int medmamba_ss2d_scan_plan(int batch, int channels, int height, int width, int dt_rank, int d_state,
    int sm_count, int shared_optin, medmamba_scan_plan* plan)
{
    if (plan == nullptr || !validArguments(batch, channels, height, width, dt_rank, d_state) || sm_count < 0
        || shared_optin < 0 || (sm_count == 0) != (shared_optin == 0))
        return cudaErrorInvalidValue;
    if (sm_count == 0)
    {
        DeviceInfo device{};
        cudaError_t const err = deviceInfo(&device);
        if (err != cudaSuccess)
            return err;
        sm_count = device.smCount;
        shared_optin = device.sharedOptin;
    }
    return planLaunch(batch, channels, height, width, dt_rank, d_state, sm_count, shared_optin, plan);
}

extern "C" char const* medmamba_ss2d_scan_error_string(int status)
{
    return cudaGetErrorString(static_cast<cudaError_t>(status));
}

extern "C" int medmamba_ss2d_scan_abi_version(void)
{
    return MEDMAMBA_SELECTIVE_SCAN_ABI_VERSION;
}
