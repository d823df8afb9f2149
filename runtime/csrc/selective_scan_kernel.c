/*
 * The CPU SS2D scan kernel (selective_scan_kernel.h), compiled into the Python extension
 * medmamba_edge.runtime._scan_cpu and into the ONNX Runtime custom-op library libmedmamba_ort_ops.
 *
 * Semantics (runtime/scan_node.py, the SS2DScan contract): for each direction k, channel d, the positions
 * p = seq_k(t) in order: delta = softplus(dt_b + dt_w . dt_low[:, p]), h = exp(delta A) h + delta B[:, p] x[d, p],
 * y[p, d] += C[:, p] . h + Ds x[d, p], summed over the four directions.
 *
 * Layout of the computation: the recurrence is sequential in t, so we vectorise across VW = 16 consecutive
 * channels (B[n, p] and C[n, p] are then scalars broadcast to all lanes).  A work item is (batch, block of
 * <= 16 channels) in all four directions, one after the other, so it alone writes y[:, block] and the sum
 * over directions has a fixed order.  It first copies its 16 channels of x channel-last (xT[p][lane]), so
 * every direction reads a step's 16 values as one vector whatever order it walks.  Per direction it walks
 * the sequence in tiles of TT steps:
 *   1. the tile's positions p = seq_k(t); x_dbl's rows are read where they are, at those positions (B[n, p] and
 *      C[n, p] are scalars, so any order costs the same loads: a layout pass writing them out in walking order,
 *      once per call, cost the whole fp32 model 2.4 % on two Xeon threads, the second thread reading what the
 *      first had written);
 *   2. delta = dt_b + dt_w . dt_low, softplus, delta * x  (vectorised over the 16 lanes);
 *   3. the scan over the tile: per step and state n, dA = 2^(delta * A[d,n]*log2(e)) with a branch-free
 *      polynomial exp2 (where A is close to Mamba's init, on AVX2 and AVX-512 by the power chain: one exp per step),
 *      h = dA h + (delta x) B[n], y += C[n] h, the loop over n unrolled (MM_UNROLL_STATES);
 *   4. y + Ds x summed over the directions in the block's own buffer (ysum), the last direction's sum into
 *      y[p][block]: 16 contiguous floats of the channel-last output, written once.
 * Plain C loops over the 16 lanes, which gcc auto-vectorises (one zmm on AVX-512, two ymm on AVX2,
 * four q registers on NEON); on AVX-512, steps 2 (softplus) and 3 and the transposes of x, A and dt_w into
 * lane order are written with intrinsics (exp2_scalef, lanes_last_avx512), which gcc does not find, and so is
 * the power chain (DEFINE_CHAIN_SCAN, once for ymm and zmm), whose powers gcc would keep in memory.  With gcc
 * or clang on x86-64 the hot function is compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and
 * the baseline (SSE2); each call runs the path it is given, by default the widest this CPU supports.
 * Explicit copies rather than target_clones, so that every path can be forced (MEDMAMBA_EDGE_SCAN_ISA) and
 * tested on any CPU able to run it.
 *
 * Threads: workers pull work items from an atomic counter, whoever runs them: our own pthreads (not
 * OpenMP, torch ships its own libgomp) for the extension, ONNX Runtime's intra-op pool for the library.
 * Results do not depend on the thread count.
 */
/* posix_memalign is POSIX, not C11: under -std=c11 glibc's <stdlib.h> declares it only when asked.  On x86 the
 * intrinsics headers (mm_malloc.h) happen to declare it; on aarch64 nothing did, so gcc 11 warned of an implicit
 * declaration and gcc >= 14 and clang >= 16 refuse one: the kernel was not built. */
#define _POSIX_C_SOURCE 200112L
#include "selective_scan_kernel.h"

#include <ctype.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* Windows' C runtime has no posix_memalign (nor C11's aligned_alloc), and what _aligned_malloc gives back must go
 * to _aligned_free, not free. */
#ifdef _WIN32
#include <malloc.h>
static void *alloc_aligned64(size_t size) { return _aligned_malloc(size, 64); }
static void free_aligned(void *p) { _aligned_free(p); }
#else
static void *alloc_aligned64(size_t size) {
    void *p;
    return posix_memalign(&p, 64, size) == 0 ? p : NULL;
}
static void free_aligned(void *p) { free(p); }
#endif

/* FMA contraction (-std=c11 turns it off) and IEEE-free min/max so the lane loops use vfmadd/vmaxps.
 * No trapping maths, so conditionals become blends. The kernel makes no floating-point NaN/inf test (finite-math-only
 * folds them) and relies on no FP exception; NaN or inf inputs give unspecified (non-crashing) output, but for A's,
 * which scan_direction tests on their bits. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast", "finite-math-only", "no-signed-zeros", "no-trapping-math")
#endif

#define VW MM_SCAN_BLOCK_CHANNELS  /* channels per vector block */
#define TT MM_SCAN_TILE_STEPS       /* time steps per tile */

/* gcc >= 11 and clang >= 14 (the oldest tried) know the x86-64-v3/v4 level names for target() (Ubuntu 22.04's and
 * RHEL 9's gcc is 11); elsewhere (aarch64, older compilers) the baseline path is the only one.  clang, which says it
 * is gcc 4, had the baseline alone: MedMamba-T's scan 4.3x slower than its AVX-512 path, one thread of an EPYC.
 * MM_SCAN_BASELINE_ONLY: setup.py's second try where a compiler refused them (zig cc with -target or -mcpu, whose
 * explicit CPU features override target()): without it neither binary was built. */
#if defined(__x86_64__) && !defined(MM_SCAN_BASELINE_ONLY) &&                                                          \
    (defined(__clang__) ? __clang_major__ >= 14 : defined(__GNUC__) && __GNUC__ >= 11)
#define MM_X86_PATHS 1
#else
#define MM_X86_PATHS 0
#endif

#define MM_INLINE static inline __attribute__((always_inline))
/* Before the loop over a step's states in every scan loop: each state's B and C loads become their own
 * instructions, each with a steady stride along the walk that the hardware prefetchers can follow, where one
 * load instruction for all states jumps a row (L floats) at every state.  MedMamba-T's node 10-15 % faster at
 * every stage on the AVX-512 path, 3-9 % on AVX2's power chain (Xeon, C harness, builds side by side), about
 * what holding B and C in L1 gave in a timing experiment.  The same results bit for bit on the AVX-512 and
 * baseline paths; on AVX2, where gcc vectorises and contracts the unrolled loop its own way, within 1 ulp. */
#define MM_UNROLL_STATES _Pragma("GCC unroll 16")
/* Before a lane loop over distinct fields of the scratch, which clang cannot prove apart (its time index is not
 * bounded by the arrays' TT): clang vectorised chain_bases' loop behind a run-time overlap test with a scalar copy
 * of it beside, never taken.  gcc needs no hint. */
#ifdef __clang__
#define MM_FIELDS_APART _Pragma("clang loop vectorize(assume_safety)")
#else
#define MM_FIELDS_APART
#endif
#define MM_ALIGN __attribute__((aligned(64)))
#define MM_AVX512 __attribute__((target("arch=x86-64-v4")))
#define MM_AVX2 __attribute__((target("arch=x86-64-v3")))

/* What a path's instruction set offers the scan. */
typedef enum {
    ISA_PLAIN,  /* no hardware FMA (fmaf would be a library call): exp2_product's plain form */
    ISA_FMA,    /* FMA (aarch64, or a baseline built for a CPU with it): exp2_product's two-FMA split in tiles
                 * whose range allows it */
    ISA_AVX2,   /* as ISA_FMA, and the power-chain scan (scan_tile_chain_avx2) */
    ISA_AVX512, /* vreduceps and vscalefps (exp2_scalef), no range to check; transposes in registers; the power
                 * chain in one zmm (scan_tile_chain_avx512) */
} path_isa;

/* Per-thread scratch: fixed-size tiles here, the rest sized by the call (one buffer, mm_scan_work). */
typedef struct {
    float dt[TT][VW] MM_ALIGN;   /* softplus(dt_b + dt_w . dt_low), time-major */
    float du[TT][VW] MM_ALIGN;   /* delta * x */
    float y[TT][VW] MM_ALIGN;    /* sum_n C h */
    ptrdiff_t pos[TT];           /* the tile's positions p = seq_k(t), the last repeated past the tile's end */
    float base[TT][VW] MM_ALIGN; /* the power chain's 2^(delta slope) */
    float bias[VW] MM_ALIGN, ds[VW] MM_ALIGN;
    float slope[VW] MM_ALIGN;    /* per lane, the s of A log2(e) ~ (n + 1) s */
    float chain_delta[VW] MM_ALIGN; /* per lane, the largest delta the chain's correction is accurate for */
    float base_delta[VW] MM_ALIGN;  /* per lane, the delta past which the base 2^(delta s) is capped at 2^-124 */
    float *xT;                   /* (L, VW): the block's x, channel-last, positions row-major */
    float *xTc;                  /* (L, VW): the same, positions column-major (directions 1 and 3): read at pos
                                  * instead of in order, xT alone made stage 1 ~1.3x slower */
    float *ysum;                 /* (L, VW): y summed over the first three directions, positions row-major: the
                                  * last writes the output once, where four read-modify-write passes over the
                                  * output shared by the threads slowed two threads down (MedMamba-T stage 1
                                  * on two Xeon threads: 2.2 -> 1.8 ms) */
    float *w;                    /* (R, VW): dt_w, rank-major */
    float *a2;                   /* (N, VW): A * log2(e) */
    float *k1, *k2;              /* (N, VW): the chain's correction 1 + delta k1 + delta^2 k2 = 2^(delta e) */
    float *h;                    /* (N, VW): state */
} scan_scratch;

/* ---------------------------------------------------------------------------------------------
 * Scalar maths written for lane loops (always inlined so each clone vectorises it).
 * ------------------------------------------------------------------------------------------- */

MM_INLINE float bits_to_float(uint32_t b) { float f; memcpy(&f, &b, sizeof f); return f; }
MM_INLINE uint32_t float_to_bits(float f) { uint32_t b; memcpy(&b, &f, sizeof b); return b; }

/* 2^f for |f| <= 0.5, fitted for relative error, highest coefficient first: degree 4 for the scan's exp per state
 * and step, degree 6 (9.6e-8) for the power chain's base, whose error its powers multiply.
 * EXP2_P4 keeps p(0) = 1 and p'(0) = ln 2 exact (5.4e-6 elsewhere, evaluated in float32): a state whose decay
 * 2^(delta A log2 e) is close to 1 remembers ~1/(delta |A|) steps, and a bias at f ~ 0 adds up over all of them.
 * The unconstrained fit (2.7e-6, but p(0) = 1 - 7e-7, p'(0) 4e-5 low) put the scan 1.8e-5 of its largest output
 * off float64 with delta |A| ~ 0.01-0.3 (delta ~ 0.7, A scaled by 0.02; review of 2026-12-06); this fit 3.4e-6. */
static const float EXP2_P4[5] = {0.009528321214020252f, 0.055793341249227524f, 0.2402510941028595f,
                                 0.6931471824645996f, 1.0f};
static const float EXP2_P6[7] = {1.534581242594868e-4f, 1.3399930903688073e-3f, 9.618489071726799e-3f,
                                 5.550328642129898e-2f, 2.4022646248340607e-1f, 6.931471824645996e-1f, 1.0f};

/* 2^(u v).  Round-to-nearest k with the 1.5*2^23 trick, 2^f (|f| <= 0.5) by EXP2_P4 (EXP2_P6 if precise), then k
 * added straight into p's exponent bits: the low mantissa bits of u v + 1.5*2^23 hold k, and shifting them left by
 * 23 drops the rest (no float->int conversion).
 *   in_range: the caller knows -125 <= u v <= 0, so no clamp; with fused (the path has hardware FMA) the product
 *     goes straight into two FMAs (k from u v + 1.5*2^23, f = u v - k as FMA computes it exactly);
 *   otherwise u v is clamped to [-126, 127] first (at most 2^-126 below, 2^127 above, never garbage).
 * The scan's exp is bound by floating-point throughput (every operation counts on AVX2, FMA most): degree 5 had
 * 2.5e-7 but one more FMA per state and step (7 % of the kernel on AVX2), and the range check per tile saves the
 * clamp and one subtraction (5 %).  The scan's error against float64 is at most 3.4e-6 of its largest output in
 * the tests' regimes; the node's bound is 1e-5. */
MM_INLINE float exp2_product(float u, float v, int in_range, int fused, int precise) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    float t, f;
    if (in_range && fused) {
        t = __builtin_fmaf(u, v, magic);
        f = __builtin_fmaf(u, v, magic - t);
    } else {
        float x = u * v;
        if (!in_range) {
            x = x > -126.0f ? x : -126.0f;
            x = x < 127.0f ? x : 127.0f;
        }
        t = x + magic;
        f = x - (t - magic);
    }
    const float *coeffs = precise ? EXP2_P6 : EXP2_P4;
    float p = coeffs[0];
    for (int i = 1; i <= (precise ? 6 : 4); i++) p = p * f + coeffs[i];
    return bits_to_float(float_to_bits(p) + (float_to_bits(t) << 23));
}

/* log(1 + z) for z in [0, 1] as z q(z), q a degree-7 polynomial fitted for relative error (3.4e-7 evaluated in
 * float32), so log1p(z) ~ z keeps its relative accuracy for small z.  No division: on cores that split 256-bit
 * divides (AMD Zen 1) the series in z / (2 + z) it replaced cost a fifth of the kernel outside the scan.
 * Coefficients highest first, for Horner's rule. */
static const float LOG1P_Q[8] = {-8.539154194295406e-3f, 4.4089365750551224e-2f, -1.0768121480941772e-1f,
                                 1.7745196819305420e-1f, -2.4495442211627960e-1f, 3.3275476098060610e-1f,
                                 -4.9997404217720030e-1f, 9.9999982118606570e-1f};

MM_INLINE float log1p_unit(float z) {
    float q = LOG1P_Q[0];
    for (int i = 1; i < 8; i++) q = q * z + LOG1P_Q[i];
    return z * q;
}

/* torch.nn.functional.softplus(x, threshold=20): x if x > 20 else log1p(exp(x)),
 * computed stably as max(x, 0) + log1p(exp(-|x|)), exp(-|x|) = 2^(-|x| log2 e) in (0, 1].  Past 20 that is x
 * exactly: log1p(exp(-x)) < 2.1e-9 is below half an ulp of x (9.5e-7), so the threshold needs no test.
 * |x| is capped at 86 (2^-124.1), which keeps the exponent in exp2_product's range without its two clamps: beyond
 * it the true log1p(exp(-|x|)) < 2.3e-38 is replaced by exp(-86) = 4.4e-38, where the clamped form gave 2^-126,
 * both far below half an ulp of max(x, 0) or flushed as denormals would be.  One operation instead of two, and with
 * fused the product goes straight into the FMAs: softplus 3 of its ~21 vector operations shorter.
 * precise (EXP2_P6) where states may grow: delta's error multiplies the whole exponent such a state carries. */
MM_INLINE float softplus20(float x, int fused, int precise) {
    const float pos = x > 0.0f ? x : 0.0f;
    const float magnitude = __builtin_fabsf(x) < 86.0f ? __builtin_fabsf(x) : 86.0f;
    return pos + log1p_unit(exp2_product(magnitude, -1.44269504088896341f, 1, fused, precise));
}

/* ---------------------------------------------------------------------------------------------
 * The scan of one tile: steps [0, tl) of the block, state h (N, VW) carried across tiles.
 * ------------------------------------------------------------------------------------------- */

MM_INLINE void scan_tile(float *restrict h, const float *restrict a2, float (*restrict dtt)[VW],
                         float (*restrict dut)[VW], float (*restrict yt)[VW], const float *restrict Bk,
                         const float *restrict Ck, const ptrdiff_t *restrict pos, ptrdiff_t L, int tl, int N, int in_range,
                         path_isa isa, int precise) {
    for (int t = 0; t < tl; t++) {
        float acc[VW] MM_ALIGN;
        const float *restrict bp = Bk + pos[t], *restrict cp = Ck + pos[t];
        for (int l = 0; l < VW; l++) acc[l] = 0.0f;
        MM_UNROLL_STATES
        for (int n = 0; n < N; n++) {
            const float b = bp[n * L];
            const float c = cp[n * L];
            for (int l = 0; l < VW; l++) {
                float dA = exp2_product(dtt[t][l], a2[n * VW + l], in_range, isa != ISA_PLAIN, precise);
                float hv = dA * h[n * VW + l] + dut[t][l] * b;
                h[n * VW + l] = hv;
                acc[l] += c * hv;
            }
        }
        for (int l = 0; l < VW; l++) yt[t][l] = acc[l];
    }
}

#if MM_X86_PATHS
/* ---------------------------------------------------------------------------------------------
 * The power chain (AVX2 and AVX-512 paths): a tile's scan with one exp per step instead of one per state and step.
 *
 * Mamba initialises A = -(1, 2, ..., N) (S4D-real) and training moves it little: fitted per channel, A log2(e) =
 * (n + 1) s + e_n with |e_n| <= 0.07 in every block of MedMamba-T trained on PneumoniaMNIST.  Then
 *   2^(delta A_n log2 e) = E^(n + 1) 2^(delta e_n),  E = 2^(delta s):
 * E once per step (EXP2_P6: its powers multiply its error by up to N), the powers by one multiply per state, and
 * 2^(delta e_n) = 1 + z + z^2 / 2 (z = delta e_n ln 2) to 2.1e-7 while delta |e_n| <= 1/64, a bound a tile takes
 * this path only if every lane keeps (chain_delta; in that model delta |e_n| stays below 0.005).  7 vector
 * operations per state and step instead of exp2_product's 12: the node 7-10 % faster at MedMamba-T's stages 1-3
 * (3 % at stage 4) on the AVX2 path of a Xeon.  On AVX-512, against exp2_scalef's 10 instructions, it measured no
 * faster in ONNX Runtime; against the 11 of its exact reduction (exp2_scalef's comment) it takes the node from
 * 8.31 to 7.61 ms and the model 2.7 % faster (the trained checkpoint, side by side, 2026-12-06).  Only where the
 * powers' error stays small (N <= 16) and A <= 0 (E <= 1, no overflow); other blocks and tiles take the exp per
 * state.
 * ------------------------------------------------------------------------------------------- */

#define CHAIN_MAX_STATES 16
#define CHAIN_MAX_Z (1.0f / 64.0f) /* the largest delta |e_n| */

/* The block's slope s (least squares over n), correction coefficients k1 = e ln 2, k2 = (e ln 2)^2 / 2,
 * chain_delta and base_delta from its a2. */
MM_INLINE void chain_setup(scan_scratch *restrict s, int N) {
    const float ln2 = 0.693147180559945309f;
    const float squares = (float)(N * (N + 1) * (2 * N + 1) / 6); /* sum of (n + 1)^2 */
    float emax[VW] MM_ALIGN, num[VW] MM_ALIGN;
    for (int l = 0; l < VW; l++) num[l] = emax[l] = 0.0f;
    for (int n = 0; n < N; n++) {
        for (int l = 0; l < VW; l++) num[l] += (float)(n + 1) * s->a2[n * VW + l];
    }
    for (int l = 0; l < VW; l++) s->slope[l] = num[l] / squares;
    for (int n = 0; n < N; n++) {
        for (int l = 0; l < VW; l++) {
            const float e = s->a2[n * VW + l] - (float)(n + 1) * s->slope[l];
            emax[l] = emax[l] > __builtin_fabsf(e) ? emax[l] : __builtin_fabsf(e);
            s->k1[n * VW + l] = e * ln2;
            s->k2[n * VW + l] = 0.5f * (e * ln2) * (e * ln2);
        }
    }
    for (int l = 0; l < VW; l++) {
        s->chain_delta[l] = emax[l] > 0.0f ? CHAIN_MAX_Z / emax[l] : 3.0e38f;
        s->base_delta[l] = s->slope[l] < 0.0f ? -124.0f / s->slope[l] : 3.0e38f;
    }
}

/* Whether the tile's largest delta in each lane (deltas are >= 0 after softplus) keeps the lane's correction
 * accurate. */
MM_INLINE int chain_fits(const scan_scratch *restrict s, const float *restrict dmax) {
    int fits = 1;
    for (int l = 0; l < VW; l++) fits &= dmax[l] <= s->chain_delta[l];
    return fits;
}

/* The tile's bases E = 2^(delta s), s <= 0 (A <= 0), delta capped at base_delta: then the exponent is within
 * exp2_product's range, which saves its clamps (one operation for two) and lets the product go into its FMAs; a
 * base below 2^-124 differs from its cap by less than 2^-124, where the clamped form gave 2^-126. */
MM_INLINE void chain_bases(scan_scratch *restrict s, int tl) {
    for (int t = 0; t < tl; t++) {
        MM_FIELDS_APART
        for (int l = 0; l < VW; l++) {
            const float delta = s->dt[t][l] < s->base_delta[l] ? s->dt[t][l] : s->base_delta[l];
            s->base[t][l] = exp2_product(delta, s->slope[l], 1, 1, 1);
        }
    }
}

/* The chain's scan, written once for a vector type V of VN vectors per 16 lanes (two ymm on AVX2, one zmm on
 * AVX-512) and its intrinsics: gcc's vectorisation of the plain loop kept the powers and sums in memory (2.9 ns per
 * state and step against 2.2 here; the exp per state's loop takes 3.2, single-core loop benchmark on a Xeon).
 * With two vectors per 16 lanes (AVX2) a barrier at each step: without it gcc kept the tile's 32 states in
 * registers across steps, spilled them to the stack and stored each update twice (there and in h); with it h is
 * loaded and stored once (the node 2-6 % faster, one Zen 3 thread).  AVX-512's 16 states fit in its registers. */
#define DEFINE_CHAIN_SCAN(NAME, TARGET, V, VN, LOAD, STORE, SET1, FMADD, MUL)                                          \
    TARGET MM_INLINE void NAME##_n(scan_scratch *restrict s, const float *restrict Bk, const float *restrict Ck,       \
                                   ptrdiff_t L, int tl, int N) {                                                      \
        enum { W = VW / VN }; /* lanes per vector */                                                                  \
        float *restrict hs = s->h;                                                                                    \
        const float *restrict k1s = s->k1, *restrict k2s = s->k2;                                                     \
        const V one = SET1(1.0f);                                                                                     \
        for (int t = 0; t < tl; t++) {                                                                                \
            if (VN > 1) __asm__ volatile("" ::: "memory");                                                            \
            V delta[VN], du[VN], E[VN], power[VN], acc[VN];                                                           \
            for (int v = 0; v < VN; v++) {                                                                            \
                delta[v] = LOAD(s->dt[t] + v * W), du[v] = LOAD(s->du[t] + v * W), E[v] = LOAD(s->base[t] + v * W);   \
                power[v] = E[v], acc[v] = SET1(0.0f);                                                                 \
            }                                                                                                         \
            const float *restrict bp = Bk + s->pos[t], *restrict cp = Ck + s->pos[t];                                 \
            MM_UNROLL_STATES                                                                                          \
            for (int n = 0; n < N; n++) {                                                                             \
                const V b = SET1(bp[n * L]), c = SET1(cp[n * L]);                                                     \
                for (int v = 0; v < VN; v++) {                                                                        \
                    const float *restrict k1 = k1s + n * VW + v * W, *restrict k2 = k2s + n * VW + v * W;            \
                    float *restrict h = hs + n * VW + v * W;                                                          \
                    const V corr = FMADD(FMADD(delta[v], LOAD(k2), LOAD(k1)), delta[v], one);                         \
                    const V hv = FMADD(MUL(power[v], corr), LOAD(h), MUL(du[v], b));                                  \
                    power[v] = MUL(power[v], E[v]);                                                                   \
                    STORE(h, hv);                                                                                     \
                    acc[v] = FMADD(c, hv, acc[v]);                                                                    \
                }                                                                                                     \
            }                                                                                                         \
            for (int v = 0; v < VN; v++) STORE(s->y[t] + v * W, acc[v]);                                              \
        }                                                                                                             \
    }                                                                                                                 \
    /* N = 16 (MedMamba) gets its own copy with a constant trip count */                                            \
    TARGET static void NAME(scan_scratch *restrict s, const float *restrict Bk, const float *restrict Ck,           \
                            ptrdiff_t L, int tl, int N) {                                                             \
        if (N == 16)                                                                                                  \
            NAME##_n(s, Bk, Ck, L, tl, 16);                                                                           \
        else                                                                                                          \
            NAME##_n(s, Bk, Ck, L, tl, N);                                                                            \
    }

DEFINE_CHAIN_SCAN(scan_tile_chain_avx2, MM_AVX2, __m256, 2, _mm256_load_ps, _mm256_store_ps, _mm256_set1_ps,
                  _mm256_fmadd_ps, _mm256_mul_ps)
#endif

#if MM_X86_PATHS
/* 2^x the AVX-512 way: vreduceps gives f = x - round(x) in [-0.5, 0.5] exactly, vscalefps p(f) 2^(x - f), zero
 * (with the kernel's FTZ) where that underflows, so no clamp and no range check.  Around the polynomial that is 4
 * instructions where exp2_product's fastest form needs 5, and the scan's loop is bound by the count of its
 * instructions on the two vector ports: 11 per state and step instead of 12.
 * Rounded to nearest, not down: x - floor(x) = 1 + x for the slowest decays (x just below 0) rounds away the low
 * bits of x, and with them the decay's distance from 1 that such a state sums over ~1/|x| steps (the scan was
 * 4.3e-5 of its largest output off float64 there; EXP2_P4's comment); f = x keeps them, and the one subtraction
 * more cost ~5 % of the node on one Xeon thread, nothing measurable on two. */
MM_AVX512 MM_INLINE __m512 exp2_scalef(__m512 x) {
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(EXP2_P4[0]);
    for (int i = 1; i <= 4; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_P4[i]));
    return _mm512_scalef_ps(p, _mm512_sub_ps(x, f));
}

/* scan_tile with one zmm for the 16 lanes and exp2_scalef. */
MM_AVX512 MM_INLINE void scan_tile_zmm(float *restrict h, const float *restrict a2, float (*restrict dtt)[VW],
                                       float (*restrict dut)[VW], float (*restrict yt)[VW], const float *restrict Bk,
                                       const float *restrict Ck, const ptrdiff_t *restrict pos, ptrdiff_t L, int tl,
                                       int N) {
    _Static_assert(VW == 16, "one zmm holds a block's lanes");
    for (int t = 0; t < tl; t++) {
        const __m512 delta = _mm512_load_ps(dtt[t]), du = _mm512_load_ps(dut[t]);
        const float *restrict bp = Bk + pos[t], *restrict cp = Ck + pos[t];
        __m512 acc = _mm512_setzero_ps();
        MM_UNROLL_STATES
        for (int n = 0; n < N; n++) {
            const __m512 dA = exp2_scalef(_mm512_mul_ps(delta, _mm512_load_ps(a2 + n * VW)));
            const __m512 hv = _mm512_fmadd_ps(dA, _mm512_load_ps(h + n * VW), _mm512_mul_ps(du, _mm512_set1_ps(bp[n * L])));
            _mm512_store_ps(h + n * VW, hv);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(cp[n * L]), hv, acc);
        }
        _mm512_store_ps(yt[t], acc);
    }
}

/* Not always_inline: the paths without AVX-512 call it only from code they never run, and could not inline it.
 * N = 16 (MedMamba) gets its own copy with a constant trip count. */
MM_AVX512 static void scan_tile_avx512(float *restrict h, const float *restrict a2, float (*restrict dtt)[VW],
                                       float (*restrict dut)[VW], float (*restrict yt)[VW], const float *restrict Bk,
                                       const float *restrict Ck, const ptrdiff_t *restrict pos, ptrdiff_t L, int tl,
                                       int N) {
    if (N == 16)
        scan_tile_zmm(h, a2, dtt, dut, yt, Bk, Ck, pos, L, tl, 16);
    else
        scan_tile_zmm(h, a2, dtt, dut, yt, Bk, Ck, pos, L, tl, N);
}

DEFINE_CHAIN_SCAN(scan_tile_chain_avx512, MM_AVX512, __m512, 1, _mm512_load_ps, _mm512_store_ps, _mm512_set1_ps,
                  _mm512_fmadd_ps, _mm512_mul_ps)

/* softplus20 with exp2_scalef for its exp (3 instructions fewer than exp2_product's clamped form); its last
 * multiply-add also adds max(x, 0). */
MM_AVX512 MM_INLINE __m512 softplus_zmm(__m512 x) {
    const __m512 z = exp2_scalef(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-1.44269504088896341f)));
    __m512 q = _mm512_set1_ps(LOG1P_Q[0]);
    for (int i = 1; i < 8; i++) q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(LOG1P_Q[i]));
    return _mm512_fmadd_ps(z, q, _mm512_max_ps(x, _mm512_setzero_ps()));
}

/* Step 2's tail on AVX-512: delta = softplus(dt) in place (if softplus), and delta * x, x of step t at
 * x0 + t * stride. */
MM_AVX512 static void delta_x_avx512(float (*restrict dtt)[VW], float (*restrict dut)[VW], const float *restrict x0,
                                     ptrdiff_t stride, int tl, int softplus) {
    for (int t = 0; t < tl; t++) {
        __m512 d = _mm512_load_ps(dtt[t]);
        if (softplus) d = softplus_zmm(d);
        _mm512_store_ps(dtt[t], d);
        _mm512_store_ps(dut[t], _mm512_mul_ps(d, _mm512_load_ps(x0 + t * stride)));
    }
}

/* r[i][j] <- r[j][i]: pairs of rows interleaved by 1, 2, 4 and 8 floats. */
MM_AVX512 MM_INLINE void transpose_16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}

/* dst[i][l] = scale * src[l * stride + i] for i < len, l < VW (0 for l >= nch): a block's rows of x, A or dt_w turned
 * lane-major by 16 x 16 transposes in registers, where the plain loops read one float per row and lane (A and dt_w
 * that way took a tenth of the node at MedMamba-T's stage 4, 768 channels on 7 x 7). */
MM_AVX512 static void lanes_last_avx512(float *restrict dst, const float *restrict src, ptrdiff_t stride, ptrdiff_t len,
                                        int nch, float scale) {
    for (ptrdiff_t i0 = 0; i0 < len; i0 += VW) {
        const int n = len - i0 < VW ? (int)(len - i0) : VW;
        const __mmask16 valid = (__mmask16)((1u << n) - 1u);
        __m512 r[VW];
        for (int l = 0; l < VW; l++) r[l] = l < nch ? _mm512_maskz_loadu_ps(valid, src + l * stride + i0) : _mm512_setzero_ps();
        transpose_16x16(r);
        for (int i = 0; i < n; i++) _mm512_store_ps(dst + (i0 + i) * VW, _mm512_mul_ps(r[i], _mm512_set1_ps(scale)));
    }
}
#endif

/* delta before softplus, dt_b + dt_w . dt_low, for the steps [t, t + 4) of the tile, into s->dt: four independent
 * accumulators, where one step's R dependent FMAs left the FMA units waiting on their latency.  dt_low's rows are
 * x_dbl's first R of the direction (row stride L).  A tile's last pass may run past its length (TT is a multiple
 * of 4): those steps read its last position again and are never used. */
MM_INLINE void delta_four_steps(scan_scratch *restrict s, const float *restrict dt_low, int t, ptrdiff_t R, ptrdiff_t L) {
    float a0[VW] MM_ALIGN, a1[VW] MM_ALIGN, a2[VW] MM_ALIGN, a3[VW] MM_ALIGN;
    for (int l = 0; l < VW; l++) a0[l] = a1[l] = a2[l] = a3[l] = s->bias[l];
    for (ptrdiff_t r = 0; r < R; r++) {
        const float *restrict v = dt_low + r * L;
        const float v0 = v[s->pos[t]], v1 = v[s->pos[t + 1]], v2 = v[s->pos[t + 2]], v3 = v[s->pos[t + 3]];
        const float *restrict w = s->w + r * VW;
        for (int l = 0; l < VW; l++) {
            a0[l] += w[l] * v0;
            a1[l] += w[l] * v1;
            a2[l] += w[l] * v2;
            a3[l] += w[l] * v3;
        }
    }
    for (int l = 0; l < VW; l++) {
        s->dt[t][l] = a0[l];
        s->dt[t + 1][l] = a1[l];
        s->dt[t + 2][l] = a2[l];
        s->dt[t + 3][l] = a3[l];
    }
}

/* Step 2's tail where AVX-512's delta_x_avx512 does not take the tile: delta = softplus(dt) in place (if softplus),
 * delta * x (x of step t at x0 + t * stride), and per lane the tile's largest delta.  Called with precise a
 * constant: a degree chosen at run time kept gcc from vectorising the loop (69de823 had the AVX2 path run it one
 * float at a time, the node 3x slower on Zen 3). */
MM_INLINE void delta_x_tile(scan_scratch *restrict s, const float *restrict x0, ptrdiff_t stride, int tl, int softplus,
                            int fused, int precise, float *restrict dmax) {
    for (int l = 0; l < VW; l++) dmax[l] = 0.0f;
    for (int t = 0; t < tl; t++) {
        const float *restrict xt = x0 + t * stride;
        for (int l = 0; l < VW; l++) {
            const float d = softplus ? softplus20(s->dt[t][l], fused, precise) : s->dt[t][l];
            s->dt[t][l] = d;
            s->du[t][l] = d * xt[l];
            dmax[l] = dmax[l] > d ? dmax[l] : d;
        }
    }
}

/* The positions p = seq_k(t) of the tile [t0, t0 + tl) (runtime/scan_node.py scan_order), where y is written;
 * the column-major walks keep (row, column) as they go rather than divide at every step. */
MM_INLINE void tile_positions(ptrdiff_t *restrict pos, int k, ptrdiff_t t0, int tl, ptrdiff_t H, ptrdiff_t W) {
    const ptrdiff_t last = H * W - 1;
    if (k == 0) {
        for (int t = 0; t < tl; t++) pos[t] = t0 + t;
    } else if (k == 2) {
        for (int t = 0; t < tl; t++) pos[t] = last - t0 - t;
    } else {
        const ptrdiff_t q = k == 1 ? t0 : last - t0;
        ptrdiff_t row = q % H, col = q / H;
        for (int t = 0; t < tl; t++) {
            pos[t] = row * W + col;
            if (k == 1 && ++row == H) {
                row = 0;
                col++;
            } else if (k == 3 && row-- == 0) {
                row = H - 1;
                col--;
            }
        }
    }
}

/* One direction k of one work item: channels [c0, c0 + nch) of batch b, the whole sequence: x_dbl's rows of
 * direction k at the walk's positions, x at q = t (k = 0, 1) or q = L - 1 - t (k = 2, 3) of xT (row-major
 * directions) or xTc (column-major). */
MM_INLINE void scan_direction(const mm_scan_args *a, scan_scratch *restrict s, ptrdiff_t b, ptrdiff_t c0, int nch, int k,
                              path_isa isa) {
    const ptrdiff_t D = a->channels, L = a->height * a->width, N = a->d_state, R = a->dt_rank;
    const ptrdiff_t P = R + 2 * N;
    const ptrdiff_t ck = (ptrdiff_t)k * D + c0; /* the block's first row of A, Ds, dt_w, dt_b */
    const float *rows = a->x_dbl + (b * MM_SCAN_DIRECTIONS + k) * P * L; /* dt_low, then B, then C */
    const float *xk = (k & 1) ? s->xTc : s->xT;
    const int forward = k < 2;
    const int n_state = (int)N;

    /* delta * A <= 0 whenever delta >= 0 (always after softplus) and A <= 0 (always in Mamba: A = -exp(A_log));
     * then a tile whose delta * max |A| stays >= -125 (in base 2) can skip exp2_product's clamps: amax2 is that
     * max (exp2_scalef needs no range). Known signs also let the power chain (E <= 1) and exp2_scalef's degree-4 exp
     * take the tile on AVX-512: the AVX-512 path took them for A > 0 too. */
    int signs_known = a->delta_softplus;
    float amax2[VW] MM_ALIGN;
    /* A NaN or +inf in A (a corrupt A_logs) went into exp2's clamps, which the compiler may read as finite, and
     * came out a plausible finite state: the channel's outputs are made NaN instead, as the reference's are, so
     * that whoever checks the logits sees it. Tested on the bits: finite-math-only folds isnan() to 0. A = -inf
     * (an A_logs past ~88.7 overflows exp to it) is not marked: exp(delta A) = 0 there, a state that forgets at
     * once, finite in the reference, the portable form and the CUDA kernel, and the clamps give it too. */
    int nan_out[VW] = {0};
    for (int l = 0; l < VW; l++) amax2[l] = 0.0f;
    for (ptrdiff_t n = 0; n < N; n++) {
        for (int l = 0; l < nch; l++) {
            const float v = a->A[(ck + l) * N + n];
            signs_known &= v <= 0.0f;
            amax2[l] = amax2[l] > -v * 1.44269504088896341f ? amax2[l] : -v * 1.44269504088896341f;
            const uint32_t bits = float_to_bits(v);
            nan_out[l] |= (bits & 0x7f800000u) == 0x7f800000u && bits != 0xff800000u;
        }
    }
    /* Padding lanes: x = 0 there, so delta * x = 0 and h stays 0; never written back. */
    for (ptrdiff_t i = 0; i < N * VW; i++) s->h[i] = 0.0f;
#if MM_X86_PATHS
    if (isa == ISA_AVX512) {
        lanes_last_avx512(s->a2, a->A + ck * N, N, N, nch, 1.44269504088896341f);
        lanes_last_avx512(s->w, a->dt_w + ck * R, R, R, nch, 1.0f);
    } else
#endif
    {
        for (ptrdiff_t n = 0; n < N; n++) {
            for (int l = 0; l < VW; l++) s->a2[n * VW + l] = l < nch ? a->A[(ck + l) * N + n] * 1.44269504088896341f : 0.0f;
        }
        for (ptrdiff_t r = 0; r < R; r++) {
            for (int l = 0; l < VW; l++) s->w[r * VW + l] = l < nch ? a->dt_w[(ck + l) * R + r] : 0.0f;
        }
    }
    for (int l = 0; l < VW; l++) {
        s->bias[l] = l < nch ? a->dt_b[ck + l] : 0.0f;
        s->ds[l] = l < nch ? (nan_out[l] ? bits_to_float(0x7fc00000u) : a->Ds[ck + l]) : 0.0f;
    }
#if MM_X86_PATHS
    /* signs_known: delta >= 0 (softplus) and A <= 0, so E <= 1 */
    const int chain = (isa == ISA_AVX2 || isa == ISA_AVX512) && signs_known && n_state <= CHAIN_MAX_STATES;
    if (chain) chain_setup(s, n_state);
#endif

    for (ptrdiff_t t0 = 0; t0 < L; t0 += TT) {
        const int tl = (L - t0) < TT ? (int)(L - t0) : TT;
        const ptrdiff_t q0 = forward ? t0 : L - 1 - t0; /* the tile's first q; then q0 + t or q0 - t */
        tile_positions(s->pos, k, t0, tl, a->height, a->width);
        for (int t = tl; t < TT; t++) s->pos[t] = s->pos[tl - 1];
        /* 2. delta = dt_b + dt_w . dt_low (four steps per pass: one step's R dependent FMAs left the FMA units
         * waiting on their latency), then softplus and delta * x; 3. the scan */
        _Static_assert(TT % 4 == 0, "delta_four_steps fills whole groups of four steps");
        for (int t = 0; t < tl; t += 4) delta_four_steps(s, rows, t, R, L);
        const float *Bk = rows + R * L, *Ck = rows + (R + N) * L;
        int in_range = 0;
        float dmax[VW] MM_ALIGN; /* per lane, the tile's largest delta (not on the AVX-512 path) */
#if MM_X86_PATHS
        if (isa == ISA_AVX512 && signs_known) {
            delta_x_avx512(s->dt, s->du, xk + q0 * VW, forward ? VW : -VW, tl, a->delta_softplus);
            if (chain) {
                for (int l = 0; l < VW; l++) dmax[l] = 0.0f;
                for (int t = 0; t < tl; t++)
                    for (int l = 0; l < VW; l++) dmax[l] = dmax[l] > s->dt[t][l] ? dmax[l] : s->dt[t][l];
            }
        } else
#endif
        {
            const float *x0 = xk + q0 * VW;
            const ptrdiff_t stride = forward ? VW : -VW;
            if (signs_known) /* softplus is one of the signs it knows: a constant here saves a blend per vector */
                delta_x_tile(s, x0, stride, tl, 1, isa != ISA_PLAIN, 0, dmax);
            else
                delta_x_tile(s, x0, stride, tl, a->delta_softplus, isa != ISA_PLAIN, 1, dmax);
            /* with signs_known, amax2 >= 0, so the tile's largest delta * max |A| * log2(e) is dmax * amax2 */
            in_range = signs_known;
            for (int l = 0; l < VW; l++) in_range &= dmax[l] * amax2[l] <= 125.0f;
        }
#if MM_X86_PATHS
        if (chain && chain_fits(s, dmax)) {
            chain_bases(s, tl);
            if (isa == ISA_AVX512)
                scan_tile_chain_avx512(s, Bk, Ck, L, tl, n_state);
            else
                scan_tile_chain_avx2(s, Bk, Ck, L, tl, n_state);
        } else if (isa == ISA_AVX512 && signs_known) {
            scan_tile_avx512(s->h, s->a2, s->dt, s->du, s->y, Bk, Ck, s->pos, L, tl, n_state);
        } else
#endif
        /* N = 16 (MedMamba) gets its own copy with a constant trip count. Without known signs (A > 0 somewhere, or
         * delta < 0 without softplus) a state can grow, and grows the exp's error with it, step after step: the
         * degree-6 exp there, and in softplus (EXP2_P4 in both put such scans up to 3.9e-4 of their largest output
         * off float64, ≤ 7e-6 now), a constant at each call as in delta_x_tile. */
        if (n_state == 16 && in_range)
            scan_tile(s->h, s->a2, s->dt, s->du, s->y, Bk, Ck, s->pos, L, tl, 16, 1, isa, 0);
        else if (in_range)
            scan_tile(s->h, s->a2, s->dt, s->du, s->y, Bk, Ck, s->pos, L, tl, n_state, 1, isa, 0);
        else if (signs_known)
            scan_tile(s->h, s->a2, s->dt, s->du, s->y, Bk, Ck, s->pos, L, tl, n_state, 0, isa, 0);
        else
            scan_tile(s->h, s->a2, s->dt, s->du, s->y, Bk, Ck, s->pos, L, tl, n_state, 0, isa, 1);
        /* 4. into the block's sum over directions (the first direction sets it, the next two add), and with the
         * last direction into the channel-last output */
        for (int t = 0; t < tl; t++) {
            const float *restrict xt = xk + (forward ? q0 + t : q0 - t) * VW;
            float *restrict sum = s->ysum + s->pos[t] * VW;
            float v[VW] MM_ALIGN;
            for (int l = 0; l < VW; l++) v[l] = s->y[t][l] + s->ds[l] * xt[l];
            if (k == 0) {
                for (int l = 0; l < VW; l++) sum[l] = v[l];
            } else if (k < MM_SCAN_DIRECTIONS - 1) {
                for (int l = 0; l < VW; l++) sum[l] += v[l];
            } else {
                float *restrict yo = a->out + (b * L + s->pos[t]) * D + c0;
                for (int l = 0; l < nch; l++) yo[l] = sum[l] + v[l];
            }
        }
    }
}

/* One work item: batch b, channels [c0, c0 + nch), all four directions in order.  Always inlined into one
 * wrapper per instruction set below, which is where it gets vectorised; isa is what that instruction set offers. */
MM_INLINE void scan_block(const mm_scan_args *a, scan_scratch *restrict s, ptrdiff_t b, ptrdiff_t c0, int nch,
                          path_isa isa) {
    const ptrdiff_t H = a->height, W = a->width, L = H * W;
    const float *x = a->x + (b * a->channels + c0) * L;
#if MM_X86_PATHS
    if (isa == ISA_AVX512)
        lanes_last_avx512(s->xT, x, L, L, nch, 1.0f);
    else
#endif
    for (ptrdiff_t p = 0; p < L; p++) {
        for (int l = 0; l < VW; l++) s->xT[p * VW + l] = l < nch ? x[l * L + p] : 0.0f;
    }
    for (ptrdiff_t col = 0; col < W; col++) {
        for (ptrdiff_t row = 0; row < H; row++) {
            float *restrict dst = s->xTc + (col * H + row) * VW;
            const float *restrict src = s->xT + (row * W + col) * VW;
            for (int l = 0; l < VW; l++) dst[l] = src[l];
        }
    }
    for (int k = 0; k < MM_SCAN_DIRECTIONS; k++) scan_direction(a, s, b, c0, nch, k, isa);
}

typedef void (*scan_block_fn)(const mm_scan_args *, scan_scratch *restrict, ptrdiff_t, ptrdiff_t, int);

#if MM_X86_PATHS
MM_AVX512 static void scan_block_avx512(const mm_scan_args *a, scan_scratch *restrict s, ptrdiff_t b, ptrdiff_t c0,
                                        int nch) {
    scan_block(a, s, b, c0, nch, ISA_AVX512);
}

MM_AVX2 static void scan_block_avx2(const mm_scan_args *a, scan_scratch *restrict s, ptrdiff_t b, ptrdiff_t c0,
                                    int nch) {
    scan_block(a, s, b, c0, nch, ISA_AVX2);
}
#endif

static void scan_block_baseline(const mm_scan_args *a, scan_scratch *restrict s, ptrdiff_t b, ptrdiff_t c0, int nch) {
#ifdef __FP_FAST_FMAF /* aarch64, or a baseline built for a CPU with FMA */
    scan_block(a, s, b, c0, nch, ISA_FMA);
#else
    scan_block(a, s, b, c0, nch, ISA_PLAIN);
#endif
}

/* The compiled paths, widest first. */
typedef struct {
    const char *name;
    scan_block_fn fn;
} scan_path;

static const scan_path PATHS[] = {
#if MM_X86_PATHS
    {"avx512", scan_block_avx512},
    {"avx2", scan_block_avx2},
#endif
    {"baseline", scan_block_baseline},
};
#define N_PATHS ((int)(sizeof PATHS / sizeof PATHS[0]))


int mm_scan_path_count(void) { return N_PATHS; }

const char *mm_scan_path_name(int path) { return PATHS[path].name; }

/* libgcc checks the OS's register state (XCR0) too, so a path is refused where the OS has not enabled it. */
int mm_scan_path_supported(int path) {
#if MM_X86_PATHS
    __builtin_cpu_init();
#if __GNUC__ >= 12
    if (PATHS[path].fn == scan_block_avx512) return __builtin_cpu_supports("x86-64-v4");
    if (PATHS[path].fn == scan_block_avx2) return __builtin_cpu_supports("x86-64-v3");
#else
    /* gcc 11 and clang take the level names in target() but not here: the features that define them and that they
     * can ask about (MOVBE, LZCNT and F16C gcc 11 cannot; every CPU with BMI2 and FMA has them). */
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2");
    if (PATHS[path].fn == scan_block_avx512)
        return v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl");
    if (PATHS[path].fn == scan_block_avx2) return v3;
#endif
#else
    (void)path;
#endif
    return 1;
}

int mm_scan_find_path(const char *name) {
    for (int i = 0; i < N_PATHS; i++) {
        if (strcmp(PATHS[i].name, name) == 0) return i;
    }
    return -1;
}

int mm_scan_default_path(void) {
    for (int i = 0; i < N_PATHS; i++) {
        if (mm_scan_path_supported(i)) return i;
    }
    return N_PATHS - 1; /* the baseline runs everywhere */
}

void mm_scan_path_names(char *buf, size_t n) {
    size_t pos = 0;
    buf[0] = '\0';
    for (int i = 0; i < N_PATHS && pos < n; i++) pos += (size_t)snprintf(buf + pos, n - pos, i ? ", %s" : "%s", PATHS[i].name);
}

int mm_scan_path_from_env(char *err, size_t err_size) {
    const char *raw = getenv(MM_SCAN_ISA_ENV);
    char value[32];
    size_t len = 0, end = 0;
    if (raw != NULL) {
        while (isspace((unsigned char)*raw)) raw++;
        end = strlen(raw);
        while (end > 0 && isspace((unsigned char)raw[end - 1])) end--;
        for (; len < end && len + 1 < sizeof value; len++) value[len] = (char)tolower((unsigned char)raw[len]);
    }
    value[len] = '\0';
    if (len == 0) return mm_scan_default_path();
    const int truncated = len < end; /* no path has so long a name: never match its first 31 characters */
    const int path = truncated ? -1 : mm_scan_find_path(value);
    if (path < 0) {
        char names[64];
        mm_scan_path_names(names, sizeof names);
        snprintf(err, err_size, "%s='%s%s': this build of the CPU scan has the paths %s", MM_SCAN_ISA_ENV, value,
                 truncated ? "..." : "", names);
        return -1;
    }
    if (!mm_scan_path_supported(path)) {
        snprintf(err, err_size, "%s=%s: this CPU cannot run it", MM_SCAN_ISA_ENV, value);
        return -1;
    }
    return path;
}

/* ---------------------------------------------------------------------------------------------
 * Shapes
 * ------------------------------------------------------------------------------------------- */

const char *const mm_scan_input_names[MM_SCAN_INPUTS] = {"x", "x_dbl", "dt_projs_weight", "dt_projs_bias", "A", "Ds"};

void mm_scan_shape_str(int ndim, const int64_t *dims, char *buf, size_t n) {
    size_t pos = (size_t)snprintf(buf, n, "(");
    const int shown = ndim < 8 ? ndim : 8;
    for (int i = 0; i < shown && pos < n; i++)
        pos += (size_t)snprintf(buf + pos, n - pos, i ? ", %lld" : "%lld", (long long)dims[i]);
    if (shown < ndim && pos < n) pos += (size_t)snprintf(buf + pos, n - pos, ", ...");
    if (ndim == 1 && pos < n) pos += (size_t)snprintf(buf + pos, n - pos, ",");
    if (pos < n) snprintf(buf + pos, n - pos, ")");
}

/* A one-line message: what an input must be (printf-style, naming it) and the shape it has. */
static int shape_error(char *err, size_t err_size, int ndim, const int64_t *dims, const char *fmt, ...) {
    char want[160], got[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(want, sizeof want, fmt, ap);
    va_end(ap);
    mm_scan_shape_str(ndim, dims, got, sizeof got);
    snprintf(err, err_size, "%s, got %s", want, got);
    return -1;
}

#define LL(v) ((long long)(v))

int mm_scan_check_shapes(const int ndim[MM_SCAN_INPUTS], const int64_t *const dims[MM_SCAN_INPUTS], mm_scan_args *a,
                         char *err, size_t err_size) {
    const int64_t K = MM_SCAN_DIRECTIONS;
    if (ndim[0] != 4)
        return shape_error(err, err_size, ndim[0], dims[0], "x must be (batch, channels, height, width)");
    const int64_t batch = dims[0][0], D = dims[0][1], H = dims[0][2], W = dims[0][3];
    /* Limits before any product of sizes: an empty tensor may have any other extent, and int64 must not overflow.
     * The per-thread scratch holds 16 floats per position and per state, and a tile of x_dbl's rows. */
    if (D > ((int64_t)1 << 40) || H > ((int64_t)1 << 26) || W > ((int64_t)1 << 26) || H * W > ((int64_t)1 << 26))
        return shape_error(err, err_size, ndim[0], dims[0], "x is too large (height * width at most 2^26)");
    if (ndim[4] != 2 || dims[4][0] != K * D || dims[4][1] < 1)
        return shape_error(err, err_size, ndim[4], dims[4], "A must be (4 * channels = %lld, d_state)", LL(K * D));
    const int64_t N = dims[4][1];
    if (ndim[2] != 3 || dims[2][0] != K || dims[2][1] != D || dims[2][2] < 1)
        return shape_error(err, err_size, ndim[2], dims[2], "dt_projs_weight must be (4, channels = %lld, dt_rank)",
                           LL(D));
    const int64_t R = dims[2][2];
    if (N > (1 << 20) || R > (1 << 20)) {
        snprintf(err, err_size, "d_state = %lld or dt_rank = %lld is too large (at most 2^20)", LL(N), LL(R));
        return -1;
    }
    if (ndim[1] != 3 || dims[1][0] != batch || dims[1][1] != K * (R + 2 * N) || dims[1][2] != H * W)
        return shape_error(err, err_size, ndim[1], dims[1],
                           "x_dbl must be (batch = %lld, 4 * (dt_rank + 2 * d_state) = %lld, height * width = %lld)",
                           LL(batch), LL(K * (R + 2 * N)), LL(H * W));
    if (ndim[3] != 2 || dims[3][0] != K || dims[3][1] != D)
        return shape_error(err, err_size, ndim[3], dims[3], "dt_projs_bias must be (4, channels = %lld)", LL(D));
    if (ndim[5] != 1 || dims[5][0] != K * D)
        return shape_error(err, err_size, ndim[5], dims[5], "Ds must be (4 * channels = %lld,)", LL(K * D));
    a->batch = (ptrdiff_t)batch;
    a->channels = (ptrdiff_t)D;
    a->height = (ptrdiff_t)H;
    a->width = (ptrdiff_t)W;
    a->dt_rank = (ptrdiff_t)R;
    a->d_state = (ptrdiff_t)N;
    return 0;
}

void mm_scan_output_dims(const mm_scan_args *a, int64_t dims[4]) {
    dims[0] = a->batch;
    dims[1] = a->height;
    dims[2] = a->width;
    dims[3] = a->channels;
}

/* ---------------------------------------------------------------------------------------------
 * Threading
 * ------------------------------------------------------------------------------------------- */

/* Flush denormals to zero (and treat denormal inputs as zero) while scanning: states decaying past
 * 2^-126 would otherwise take microcode assists on many CPUs; the values involved are < 1.2e-38.
 * Restored afterwards: the thread may be the caller's or a pool's that runs other code next. */
typedef struct { unsigned long long saved; } fp_mode;

static fp_mode fp_mode_enter(void) {
    fp_mode m = {0};
#if defined(__x86_64__) || defined(__i386__)
    m.saved = _mm_getcsr();
    _mm_setcsr((unsigned int)m.saved | 0x8040u); /* FTZ | DAZ */
#elif defined(__aarch64__)
    unsigned long long v;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
    m.saved = v;
    v |= (1ull << 24); /* FZ */
    __asm__ __volatile__("msr fpcr, %0" : : "r"(v));
#endif
    return m;
}

static void fp_mode_leave(fp_mode m) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr((unsigned int)m.saved);
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(m.saved));
#else
    (void)m;
#endif
}

void mm_scan_job_init(mm_scan_job *job, const mm_scan_args *a, int path) {
    job->args = a;
    job->path = path;
    job->blocks_per_batch = (a->channels + VW - 1) / VW;
    job->total = a->height * a->width > 0 ? job->blocks_per_batch * a->batch : 0;
    atomic_init(&job->next, 0);
    atomic_init(&job->failed, 0);
}

void mm_scan_work(mm_scan_job *job) {
    /* A pool may call this once per item: a late call leaves without touching the allocator. */
    if (atomic_load_explicit(&job->next, memory_order_relaxed) >= job->total) return;
    const mm_scan_args *a = job->args;
    const scan_block_fn block = PATHS[job->path].fn;
    const size_t L = (size_t)(a->height * a->width), N = (size_t)a->d_state, R = (size_t)a->dt_rank;
    /* xT, xTc, ysum, w, a2, k1, k2, h; each a multiple of 16 floats, so every part stays 64-byte aligned */
    const size_t floats = 3 * L * VW + R * VW + 4 * N * VW;
    scan_scratch *s = alloc_aligned64(sizeof *s);
    float *buf = s ? alloc_aligned64(sizeof(float) * floats) : NULL;
    if (buf == NULL) {
        free_aligned(s);
        atomic_store(&job->failed, 1);
        return;
    }
    s->xT = buf;
    s->xTc = s->xT + L * VW;
    s->ysum = s->xTc + L * VW;
    s->w = s->ysum + L * VW;
    s->a2 = s->w + R * VW;
    s->k1 = s->a2 + N * VW;
    s->k2 = s->k1 + N * VW;
    s->h = s->k2 + N * VW;
    const fp_mode mode = fp_mode_enter();
    for (;;) {
        long long i = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (i >= job->total) break;
        const ptrdiff_t b = (ptrdiff_t)i / job->blocks_per_batch;
        const ptrdiff_t first = ((ptrdiff_t)i % job->blocks_per_batch) * VW;
        const int nch = (int)((a->channels - first) < VW ? (a->channels - first) : VW);
        block(a, s, b, first, nch);
    }
    fp_mode_leave(mode);
    free_aligned(buf);
    free_aligned(s);
}

/* A worker that could not allocate took no item, so the items are all done unless every worker failed. */
int mm_scan_job_status(mm_scan_job *job) {
    return atomic_load(&job->failed) && atomic_load(&job->next) < job->total ? -1 : 0;
}

static void *pthread_work(void *job) {
    mm_scan_work((mm_scan_job *)job);
    return NULL;
}

/* The caller's thread and up to num_threads - 1 pthreads take the items (fewer if they cannot be created: the
 * others, and this one, take theirs). */
int mm_scan_run_pthreads(const mm_scan_args *a, int path, int num_threads) {
    mm_scan_job job;
    mm_scan_job_init(&job, a, path);
    if (num_threads > job.total) num_threads = (int)job.total;
    if (num_threads > 256) num_threads = 256;
    pthread_t tids[256];
    int started = 0;
    for (int i = 1; i < num_threads; i++) {
        if (pthread_create(&tids[started], NULL, pthread_work, &job) == 0) started++;
    }
    mm_scan_work(&job);
    for (int i = 0; i < started; i++) pthread_join(tids[i], NULL);
    return mm_scan_job_status(&job);
}
