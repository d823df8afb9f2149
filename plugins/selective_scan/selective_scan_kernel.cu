// Selective scan forward (mamba_ssm selective_scan_fn semantics, grouped B/C, no z) for MedMamba.
//
// Work decomposition. A thread block owns kR channels of one B/C group for one batch element and walks the
// sequence in tiles of 32 * kItems time steps, carrying the float32 state of every (channel, n) across
// tiles. Each channel gets kWarpsPerChannel warps and each warp owns kStates of the d_state recurrences
// (8 x 2 or 2 x 8 for d_state = 16, see fitsOneWave):
//   * inside a warp, lane l owns kItems consecutive time steps; the recurrence h_t = a_t h_{t-1} + b_t is
//     scanned with the associative pair operator (a1,b1)∘(a2,b2) = (a1 a2, a2 b1 + b2): sequentially over
//     the lane's items, then with a shuffle scan across lanes, then the lane replays its items from its
//     carried-in state. exp(delta * A) is evaluated once per (t, n): the special-function unit, not memory,
//     is the other bound of this kernel, so recomputing it in a second pass (chunked scans) would cost ~2x.
//   * splitting d_state across warps (rather than time across warps) needs no cross-warp scan and no
//     per-state __syncthreads; the price is one cross-warp sum of the y partials per tile, through shared
//     memory.
//   * B and C tiles are staged once in shared memory and read by all kR channels of the block, so that
//     their L2 traffic (16 states x 2 per time step, re-read by every channel of the group) shrinks by kR.
//   * the next tile's global loads are issued into registers before the current tile is computed, which
//     hides DRAM latency when only one block fits on an SM (stage 1 of MedMamba-T: 384 channels, L=3136).
// d_state == 16 (MedMamba, Mamba defaults) is compiled with a static d_state; other values up to
// MEDMAMBA_SCAN_MAX_D_STATE take a generic instantiation with a runtime d_state.

#include "selective_scan.h"

#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace
{

constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;
// Same threshold as medmamba_edge.runtime.scan_node.SOFTPLUS_THRESHOLD (and torch / mamba_ssm).
constexpr float kSoftplusThreshold = 20.0f;

struct ScanParams
{
    void const* u;
    void const* delta;
    float const* A;
    void const* B;
    void const* C;
    float const* D;
    float const* delta_bias;
    void* y;
    int batch;
    int channels;
    int length;
    int groups;
    int d_state;
    int delta_softplus;
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

// Shared-memory layout of one tile row. Lane l reads positions l*kItems .. l*kItems+kItems-1; for an even
// kItems that stride sends several lanes to the same bank, and one padding word per 32 spreads them over all
// 32 banks (checked for kItems = 2, 4, 8, 16). Odd strides are already conflict-free. Row-wise accesses
// (the coalesced global<->shared copies) stay conflict-free either way.
template <int kItems>
struct TileLayout
{
    static constexpr int kLength = kWarpSize * kItems;
    static constexpr bool kPadded = (kItems % 2) == 0;
    static constexpr int kStride = kPadded ? kLength + kLength / kWarpSize : kLength;
    __device__ __forceinline__ static int index(int pos)
    {
        return kPadded ? pos + (pos >> 5) : pos;
    }
};

template <typename T, int kN, int kStates, int kWarpsPerChannel, int kR, int kItems>
__global__ void __launch_bounds__(kR* kWarpsPerChannel* kWarpSize) selectiveScanKernel(ScanParams const p)
{
    using Tile = TileLayout<kItems>;
    constexpr int kWarps = kR * kWarpsPerChannel;
    constexpr int kThreads = kWarps * kWarpSize;
    constexpr int kMaxN = kN > 0 ? kN : kStates * kWarpsPerChannel;
    constexpr int kTile = Tile::kLength;
    constexpr int kStride = Tile::kStride;
    // Shared rows of a tile: kR u rows, kR delta rows, then d_state B rows and d_state C rows. Once a tile's
    // B/C rows are consumed, rows 2 kR .. 2 kR + kWarps - 1 take the per-warp y partials.
    constexpr int kMaxRows = 2 * kR + 2 * kMaxN;
    constexpr int kRowsPerWarp = (kMaxRows + kWarps - 1) / kWarps;
    // With one channel per block, 8 warps would hold 4+ rows of the next tile each, and the registers that
    // costs would keep other blocks off the SM; there, co-resident blocks hide the load latency instead.
    constexpr bool kPrefetch = kR > 1;
    static_assert(kN == 0 || kN <= kStates * kWarpsPerChannel, "every state needs an owning warp");
    static_assert(kWarps <= 2 * kMaxN, "y partials are stored in the B/C rows");

    __shared__ float sRows[kMaxRows * kStride];

    int const N = kN > 0 ? kN : p.d_state;
    int const rows = 2 * kR + 2 * N;
    int const L = p.length;
    int const channelsPerGroup = p.channels / p.groups;
    int const blocksPerGroup = (channelsPerGroup + kR - 1) / kR;
    int const g = blockIdx.x / blocksPerGroup;
    int const c0 = g * channelsPerGroup + (blockIdx.x % blocksPerGroup) * kR;
    int const nValid = min(kR, (g + 1) * channelsPerGroup - c0);
    int const b = blockIdx.y;

    size_t const rowBase = (static_cast<size_t>(b) * p.channels + c0) * L;
    T* y = static_cast<T*>(p.y) + rowBase;
    size_t const groupBase = (static_cast<size_t>(b) * p.groups + g) * N * L;

    int const warp = threadIdx.x / kWarpSize;
    int const lane = threadIdx.x % kWarpSize;
    int const r = warp / kWarpsPerChannel; // channel of this warp within the block
    int const w = warp % kWarpsPerChannel; // state slice of this warp
    bool const warpActive = r < nValid;

    float A2[kStates];    // A * log2(e): exp(delta * A) == exp2(delta * A2)
    float carry[kStates]; // state after the last processed tile, uniform across the warp
#pragma unroll
    for (int s = 0; s < kStates; ++s)
    {
        int const n = w * kStates + s;
        A2[s] = (warpActive && n < N) ? p.A[static_cast<size_t>(c0 + r) * N + n] * kLog2e : 0.0f;
        carry[s] = 0.0f;
    }

    // Global row `row` of the tile rows above, or null when it is padding (beyond the group's channels or
    // beyond d_state): padding loads as 0.
    auto globalRow = [&](int row) -> T const* {
        if (row < kR)
            return row < nValid ? static_cast<T const*>(p.u) + rowBase + static_cast<size_t>(row) * L : nullptr;
        if (row < 2 * kR)
            return row - kR < nValid
                ? static_cast<T const*>(p.delta) + rowBase + static_cast<size_t>(row - kR) * L
                : nullptr;
        if (row < 2 * kR + N)
            return static_cast<T const*>(p.B) + groupBase + static_cast<size_t>(row - 2 * kR) * L;
        if (row < rows)
            return static_cast<T const*>(p.C) + groupBase + static_cast<size_t>(row - 2 * kR - N) * L;
        return nullptr;
    };

    // Warp `warp` copies rows warp, warp + kWarps, ...; lanes stride the row, so loads are coalesced.
    float staged[kRowsPerWarp][kItems];
    auto loadTile = [&](int t0) {
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k)
        {
            T const* src = globalRow(warp + k * kWarps);
#pragma unroll
            for (int m = 0; m < kItems; ++m)
            {
                int const t = t0 + lane + m * kWarpSize;
                staged[k][m] = (src != nullptr && t < L) ? toFloat(src[t]) : 0.0f;
            }
        }
    };
    auto storeTile = [&](int t0) {
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k)
        {
            int const row = warp + k * kWarps;
            if (row >= rows)
                break;
#pragma unroll
            for (int m = 0; m < kItems; ++m)
            {
                int const pos = lane + m * kWarpSize;
                float v = staged[k][m];
                if (row >= kR && row < 2 * kR)
                {
                    // Padding steps (past the end, or past the group's last channel) must be the identity
                    // of the scan, (a, b) = (1, 0), which delta = 0 gives; the bias would break that.
                    if (row - kR < nValid && t0 + pos < L)
                    {
                        v += p.delta_bias[c0 + row - kR];
                        if (p.delta_softplus && v <= kSoftplusThreshold)
                            v = log1pf(expf(v));
                    }
                    else
                    {
                        v = 0.0f;
                    }
                }
                sRows[row * kStride + Tile::index(pos)] = v;
            }
        }
    };

    if (kPrefetch)
        loadTile(0);
    for (int t0 = 0; t0 < L; t0 += kTile)
    {
        if (!kPrefetch)
            loadTile(t0);
        storeTile(t0);
        __syncthreads();
        if (kPrefetch && t0 + kTile < L)
            loadTile(t0 + kTile); // in flight while this tile is scanned

        float yAcc[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i)
            yAcc[i] = 0.0f;

        if (warpActive)
        {
            float const* sU = sRows + r * kStride;
            float const* sDelta = sRows + (kR + r) * kStride;
            float dt[kItems];
            float du[kItems];
#pragma unroll
            for (int i = 0; i < kItems; ++i)
            {
                int const idx = Tile::index(lane * kItems + i);
                dt[i] = sDelta[idx];
                du[i] = dt[i] * sU[idx];
            }
#pragma unroll
            for (int s = 0; s < kStates; ++s)
            {
                int const n = w * kStates + s;
                if (n >= N) // warp-uniform, so the shuffles below stay converged
                    break;
                float const* sB = sRows + (2 * kR + n) * kStride;
                float const* sC = sRows + (2 * kR + N + n) * kStride;
                float a[kItems];
                float bu[kItems];
#pragma unroll
                for (int i = 0; i < kItems; ++i)
                {
                    a[i] = exp2f(dt[i] * A2[s]);
                    bu[i] = du[i] * sB[Tile::index(lane * kItems + i)];
                }
                // This lane's segment as one pair.
                float segA = a[0];
                float segB = bu[0];
#pragma unroll
                for (int i = 1; i < kItems; ++i)
                {
                    segB = a[i] * segB + bu[i];
                    segA *= a[i];
                }
                // Inclusive scan of the segments over lanes: lane l ends with lanes 0..l composed.
#pragma unroll
                for (int offset = 1; offset < kWarpSize; offset *= 2)
                {
                    float const prevA = __shfl_up_sync(0xffffffffu, segA, offset);
                    float const prevB = __shfl_up_sync(0xffffffffu, segB, offset);
                    if (lane >= offset)
                    {
                        segB = segA * prevB + segB;
                        segA *= prevA;
                    }
                }
                float const exclA = __shfl_up_sync(0xffffffffu, segA, 1);
                float const exclB = __shfl_up_sync(0xffffffffu, segB, 1);
                float const tileA = __shfl_sync(0xffffffffu, segA, kWarpSize - 1);
                float const tileB = __shfl_sync(0xffffffffu, segB, kWarpSize - 1);
                float h = lane == 0 ? carry[s] : exclA * carry[s] + exclB;
                carry[s] = tileA * carry[s] + tileB;
#pragma unroll
                for (int i = 0; i < kItems; ++i)
                {
                    h = a[i] * h + bu[i];
                    yAcc[i] += sC[Tile::index(lane * kItems + i)] * h;
                }
            }
        }
        __syncthreads(); // every warp is done with the B/C rows: they now take the y partials
        if (warpActive)
        {
            float* partial = sRows + (2 * kR + warp) * kStride;
#pragma unroll
            for (int i = 0; i < kItems; ++i)
                partial[Tile::index(lane * kItems + i)] = yAcc[i];
        }
        __syncthreads();
        for (int e = threadIdx.x; e < kR * kTile; e += kThreads)
        {
            int const rr = e / kTile;
            int const pos = e % kTile;
            int const t = t0 + pos;
            if (rr < nValid && t < L)
            {
                int const idx = Tile::index(pos);
                float acc = p.D[c0 + rr] * sRows[rr * kStride + idx];
#pragma unroll
                for (int ww = 0; ww < kWarpsPerChannel; ++ww)
                    acc += sRows[(2 * kR + rr * kWarpsPerChannel + ww) * kStride + idx];
                y[static_cast<size_t>(rr) * L + t] = fromFloat<T>(acc);
            }
        }
        __syncthreads(); // the next storeTile overwrites every row
    }
}

template <typename T, int kN, int kStates, int kWarpsPerChannel, int kR, int kItems>
cudaError_t launch(ScanParams const& p, cudaStream_t stream)
{
    int const channelsPerGroup = p.channels / p.groups;
    dim3 const grid(p.groups * ((channelsPerGroup + kR - 1) / kR), p.batch);
    int const threads = kR * kWarpsPerChannel * kWarpSize;
    selectiveScanKernel<T, kN, kStates, kWarpsPerChannel, kR, kItems><<<grid, threads, 0, stream>>>(p);
    return cudaGetLastError();
}

// Items per lane: the tile (32 * kItems steps) should not overshoot L by much, and larger kItems amortise
// the shuffle scan (~2 items' worth of work per lane and state). Cost ~ padded length * (kItems + 2) / kItems;
// ties go to the larger kItems. MedMamba's L = 49 * 4^k give 2 for L = 49, 7 otherwise (3136 = 14 tiles).
int chooseItems(int length)
{
    static constexpr int kCandidates[] = {7, 4, 2};
    int best = 2;
    long long bestCost = -1;
    for (int k : kCandidates)
    {
        long long const tile = kWarpSize * k;
        long long const padded = (length + tile - 1) / tile * tile;
        long long const cost = padded * (k + 2) * (28 / k); // 28 = lcm(7, 4, 2) keeps it integral
        if (bestCost < 0 || cost < bestCost)
        {
            best = k;
            bestCost = cost;
        }
    }
    return best;
}

// Channels per block within one wave: more share each B/C tile, fewer give more blocks. Minimise the channels
// on the busiest SM (blocks spread evenly), preferring larger blocks when within 5%: e.g. 384 channels on 132
// SMs -> 3 (128 blocks, one wave) rather than 2 (192 blocks, some SMs doing two).
int chooseChannelsPerBlock(ScanParams const& p, int smCount)
{
    int const channelsPerGroup = p.channels / p.groups;
    long long costs[4] = {};
    long long minCost = -1;
    for (int r = 1; r <= 3; ++r)
    {
        long long const blocks = static_cast<long long>(p.batch) * p.groups * ((channelsPerGroup + r - 1) / r);
        costs[r] = (blocks + smCount - 1) / smCount * r;
        if (minCost < 0 || costs[r] < minCost)
            minCost = costs[r];
    }
    for (int r = 3; r > 1; --r)
    {
        if (costs[r] * 100 <= minCost * 105)
            return r;
    }
    return 1;
}

cudaError_t smCount(int* count)
{
    constexpr int kCachedDevices = 64;
    static std::atomic<int> cache[kCachedDevices];
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess)
        return err;
    if (device >= 0 && device < kCachedDevices)
    {
        int const cached = cache[device].load(std::memory_order_relaxed);
        if (cached > 0)
        {
            *count = cached;
            return cudaSuccess;
        }
    }
    err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess && device >= 0 && device < kCachedDevices)
        cache[device].store(*count, std::memory_order_relaxed);
    return err;
}

// Block shape. While blocks of three 8-warp channels cover the GPU in one wave (stage 1 of MedMamba-T at batch
// 1: 128 blocks), the scan is latency-bound, and 8 warps per channel (2 states each) keep the per-tile chain
// short. Beyond one wave it is issue-bound: 2 warps per channel (8 states each) issue fewer instructions per
// state and two blocks share an SM. The throughput shapes below were the fastest of a sweep on an H200 over
// the MedMamba-T stage shapes at batch 1 and 8 (plugins/selective_scan/README.md); float16 with 7 items per
// lane ran 1.7x slower than with 4 there, so float16 stops at 4.
bool fitsOneWave(ScanParams const& p, int smCount)
{
    int const channelsPerGroup = p.channels / p.groups;
    return static_cast<long long>(p.batch) * p.groups * ((channelsPerGroup + 2) / 3) <= smCount;
}

template <typename T, int kItems>
cudaError_t launchThroughputShape(ScanParams const& p, cudaStream_t stream)
{
    if constexpr (kItems > 4 && std::is_same_v<T, __half>)
        return launch<T, 16, 8, 2, 4, 4>(p, stream);
    else if constexpr (kItems > 4)
        return launch<T, 16, 8, 2, 3, kItems>(p, stream);
    else
        return launch<T, 16, 8, 2, 4, kItems>(p, stream);
}

template <typename T, int kItems>
cudaError_t launchFastPath(ScanParams const& p, int smCount, cudaStream_t stream)
{
    if (!fitsOneWave(p, smCount))
        return launchThroughputShape<T, kItems>(p, stream);
    switch (chooseChannelsPerBlock(p, smCount))
    {
    case 3: return launch<T, 16, 2, 8, 3, kItems>(p, stream);
    case 2: return launch<T, 16, 2, 8, 2, kItems>(p, stream);
    default: return launch<T, 16, 2, 8, 1, kItems>(p, stream);
    }
}

template <typename T>
cudaError_t dispatch(ScanParams const& p, cudaStream_t stream)
{
    if (p.d_state != 16)
        return launch<T, 0, 8, 8, 1, 2>(p, stream);
    int sms = 0;
    cudaError_t const err = smCount(&sms);
    if (err != cudaSuccess)
        return err;
    switch (chooseItems(p.length))
    {
    case 7: return launchFastPath<T, 7>(p, sms, stream);
    case 4: return launchFastPath<T, 4>(p, sms, stream);
    default: return launchFastPath<T, 2>(p, sms, stream);
    }
}

} // namespace

extern "C" int medmamba_selective_scan_forward(void const* u, void const* delta, float const* A, void const* B,
    void const* C, float const* D, float const* delta_bias, void* y, int batch, int channels, int length, int groups,
    int d_state, int delta_softplus, int dtype, cudaStream_t stream)
{
    if (!u || !delta || !A || !B || !C || !D || !delta_bias || !y)
        return cudaErrorInvalidValue;
    // grid.y holds the batch (at most 65535); groups * blocks-per-group fits grid.x for any int channels.
    if (batch < 0 || batch > 65535 || channels <= 0 || length < 0 || groups <= 0 || channels % groups != 0
        || d_state <= 0 || d_state > MEDMAMBA_SCAN_MAX_D_STATE
        || (dtype != MEDMAMBA_SCAN_FLOAT32 && dtype != MEDMAMBA_SCAN_FLOAT16))
        return cudaErrorInvalidValue;
    if (batch == 0 || length == 0)
        return cudaSuccess;
    ScanParams const p{u, delta, A, B, C, D, delta_bias, y, batch, channels, length, groups, d_state,
        delta_softplus != 0};
    return dtype == MEDMAMBA_SCAN_FLOAT16 ? dispatch<__half>(p, stream) : dispatch<float>(p, stream);
}

extern "C" char const* medmamba_selective_scan_error_string(int status)
{
    return cudaGetErrorString(static_cast<cudaError_t>(status));
}

extern "C" int medmamba_selective_scan_abi_version(void)
{
    return MEDMAMBA_SELECTIVE_SCAN_ABI_VERSION;
}
