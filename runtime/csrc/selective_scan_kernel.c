/*
 * The CPU selective scan kernel (selective_scan_kernel.h), compiled into the Python extension
 * medmamba_edge.runtime._scan_cpu and into the ONNX Runtime custom-op library libmedmamba_ort_ops.
 *
 * Semantics (runtime/scan_node.py, medmamba_edge/scan.py: selective_scan_ref):
 *   u, delta (batch, KD, L); A (KD, N); B, C (batch, G, N, L), channel d uses group d / (KD/G);
 *   D, delta_bias (KD,).  delta += delta_bias; if delta_softplus: delta = softplus(delta) (x if x > 20);
 *   h_t[n] = exp(delta_t A[d,n]) h_{t-1}[n] + delta_t u_t B[g,n,t];  y_t = sum_n C[g,n,t] h_t[n] + D[d] u_t.
 *
 * Layout of the computation: the recurrence is sequential in t, so we vectorise across VW = 16
 * consecutive channels of one group (B_t[n] and C_t[n] are then scalars broadcast to all lanes).
 * A work item is (batch, group, block of <= 16 channels); it walks the sequence in tiles of TT steps:
 *   1. per channel row (contiguous in t): delta + bias, softplus, delta*u  (vectorised over t),
 *      transposed into tile[t][lane];
 *   2. the scan over the tile: per step and state n, dA = 2^(delta * A[d,n]*log2(e)) with a branch-free
 *      polynomial exp2, h = dA h + (delta u) B[n], y += C[n] h  (vectorised over the 16 lanes);
 *   3. y tile transposed back, plus D u, into the output rows.
 * Plain C loops over the 16 lanes, which gcc auto-vectorises (one zmm on AVX-512, two ymm on AVX2,
 * four q registers on NEON).  With gcc on x86-64 the hot function is compiled three times, for
 * x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and the baseline (SSE2); each call runs the path it is
 * given, by default the widest this CPU supports.  Explicit copies rather than target_clones, so that
 * every path can be forced (MEDMAMBA_EDGE_SCAN_ISA) and tested on any CPU able to run it.
 *
 * Threads: workers pull work items from an atomic counter, whoever runs them: our own pthreads (not
 * OpenMP, torch ships its own libgomp) for the extension, ONNX Runtime's intra-op pool for the library.
 * Results do not depend on the thread count.
 */
#include "selective_scan_kernel.h"

#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

/* FMA contraction (-std=c11 turns it off) and IEEE-free min/max so the lane loops use vfmadd/vmaxps.
 * No trapping maths, so conditionals become blends. The kernel never relies on NaN/inf tests or FP
 * exceptions; NaN or inf inputs give unspecified (non-crashing) output. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast", "finite-math-only", "no-signed-zeros", "no-trapping-math")
#endif

#define VW MM_SCAN_BLOCK_CHANNELS  /* channels per vector block */
#define TT MM_SCAN_TILE_STEPS       /* time steps per tile */

/* gcc >= 12 knows the x86-64-v3/v4 level names for target() and __builtin_cpu_supports(); elsewhere
 * (aarch64, clang, older gcc) the baseline path is the only one. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MM_X86_PATHS 1
#else
#define MM_X86_PATHS 0
#endif

#define MM_INLINE static inline __attribute__((always_inline))
#define MM_ALIGN __attribute__((aligned(64)))

/* Per-thread scratch: channel-major rows (as in memory) and their time-major transposes (tiles). */
typedef struct {
    float rd[VW][TT] MM_ALIGN;   /* rows: softplus(delta + bias) */
    float ru[VW][TT] MM_ALIGN;   /* rows: delta * u */
    float ry[VW][TT] MM_ALIGN;   /* rows: sum_n C h */
    float dt[TT][VW] MM_ALIGN;   /* tiles of the same */
    float du[TT][VW] MM_ALIGN;
    float y[TT][VW] MM_ALIGN;
    float *a2;                   /* (N, VW): A * log2(e) */
    float *h;                    /* (N, VW): state */
} scan_scratch;

/* ---------------------------------------------------------------------------------------------
 * Scalar maths written for lane loops (always inlined so each clone vectorises it).
 * ------------------------------------------------------------------------------------------- */

MM_INLINE float bits_to_float(uint32_t b) { float f; memcpy(&f, &b, sizeof f); return f; }
MM_INLINE uint32_t float_to_bits(float f) { uint32_t b; memcpy(&b, &f, sizeof b); return b; }

/* 2^x, relative error ~2.5e-7, for x <= 127 (x < -126 gives at most 2^-126; with clamp_hi,
 * x > 127 gives 2^127 instead of overflowing).  Round-to-nearest k with the 1.5*2^23 trick, 2^f
 * (|f| <= 0.5) by a degree-5 minimax polynomial p in [0.7, 1.42], then k added straight into p's
 * exponent bits: the low mantissa bits of x + 1.5*2^23 hold k, and shifting them left by 23 drops
 * the rest (no multiply, no float->int conversion). */
MM_INLINE float fast_exp2(float x, int clamp_hi) {
    x = x > -126.0f ? x : -126.0f;
    if (clamp_hi) x = x < 127.0f ? x : 127.0f;
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    float t = x + magic;
    float k = t - magic;
    float f = x - k;
    float p = 1.3276364e-3f;
    p = p * f + 9.6755410e-3f;
    p = p * f + 5.5507135e-2f;
    p = p * f + 2.4022120e-1f;
    p = p * f + 6.9314694e-1f;
    p = p * f + 1.0000001f;
    return bits_to_float(float_to_bits(p) + (float_to_bits(t) << 23));
}

/* e^x, Cephes-style: k = round(x log2 e), r = x - k ln2 (two-part ln2), e^r by polynomial. ~1-2 ulp. */
MM_INLINE float fast_exp(float x) {
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    const float magic = 12582912.0f;
    float t = x * 1.44269504088896341f + magic;
    float k = t - magic;
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    float scale = bits_to_float((float_to_bits(t) + 127u) << 23);
    return p * scale;
}

/* log(1 + z) for z in [0, 1]: 2 atanh(s), s = z / (2 + z) in [0, 1/3]; series to s^15 (error < 2e-9),
 * no cancellation for small z. */
MM_INLINE float log1p_unit(float z) {
    float s = z / (2.0f + z);
    float s2 = s * s;
    float p = 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* torch.nn.functional.softplus(x, threshold=20): x if x > 20 else log1p(exp(x)),
 * computed stably as max(x, 0) + log1p(exp(-|x|)). */
MM_INLINE float softplus20(float x) {
    float ax = __builtin_fabsf(x);
    float pos = x > 0.0f ? x : 0.0f;
    float sp = pos + log1p_unit(fast_exp(-ax));
    return x > 20.0f ? x : sp;
}

/* ---------------------------------------------------------------------------------------------
 * 16 x 16 transpose, dst[c * dst_stride + k] = src[k * src_stride + c] for k, c < 16, as 4 x 4 blocks
 * of 128-bit vectors with generic vector shuffles (gcc and clang): native on every target (unpck/shufps on SSE and
 * AVX, zip/trn on NEON).  (A 512-bit butterfly version measured the same on AVX-512, and gcc turns
 * 512-bit shuffles into scalar moves on the other targets.)
 * ------------------------------------------------------------------------------------------- */

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

#if defined(__clang__)
#define MM_SHUF4(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, i0, i1, i2, i3)
#else
#define MM_SHUF4(a, b, i0, i1, i2, i3) __builtin_shuffle(a, b, (v4i){i0, i1, i2, i3})
#endif

MM_INLINE void transpose16(float *restrict dst, ptrdiff_t dst_stride, const float *restrict src,
                           ptrdiff_t src_stride) {
    for (int bi = 0; bi < 4; bi++) {
        for (int bj = 0; bj < 4; bj++) {
            v4f r0, r1, r2, r3;
            const float *s = src + 4 * bi * src_stride + 4 * bj;
            memcpy(&r0, s, sizeof r0);
            memcpy(&r1, s + src_stride, sizeof r1);
            memcpy(&r2, s + 2 * src_stride, sizeof r2);
            memcpy(&r3, s + 3 * src_stride, sizeof r3);
            v4f t0 = MM_SHUF4(r0, r1, 0, 4, 1, 5), t1 = MM_SHUF4(r0, r1, 2, 6, 3, 7);
            v4f t2 = MM_SHUF4(r2, r3, 0, 4, 1, 5), t3 = MM_SHUF4(r2, r3, 2, 6, 3, 7);
            v4f o0 = MM_SHUF4(t0, t2, 0, 1, 4, 5), o1 = MM_SHUF4(t0, t2, 2, 3, 6, 7);
            v4f o2 = MM_SHUF4(t1, t3, 0, 1, 4, 5), o3 = MM_SHUF4(t1, t3, 2, 3, 6, 7);
            float *d = dst + 4 * bj * dst_stride + 4 * bi;
            memcpy(d, &o0, sizeof o0);
            memcpy(d + dst_stride, &o1, sizeof o1);
            memcpy(d + 2 * dst_stride, &o2, sizeof o2);
            memcpy(d + 3 * dst_stride, &o3, sizeof o3);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * The scan of one tile: steps [0, tl) of the block, state h (N, VW) carried across tiles.
 * ------------------------------------------------------------------------------------------- */

MM_INLINE void scan_tile(float *restrict h, const float *restrict a2, float (*restrict dtt)[VW],
                         float (*restrict dut)[VW], float (*restrict yt)[VW], const float *restrict Bt,
                         const float *restrict Ct, ptrdiff_t L, int tl, int N, int clamp_hi) {
    for (int t = 0; t < tl; t++) {
        float acc[VW] MM_ALIGN;
        for (int l = 0; l < VW; l++) acc[l] = 0.0f;
        for (int n = 0; n < N; n++) {
            const float b = Bt[n * L + t];
            const float c = Ct[n * L + t];
            for (int l = 0; l < VW; l++) {
                float dA = fast_exp2(dtt[t][l] * a2[n * VW + l], clamp_hi);
                float hv = dA * h[n * VW + l] + dut[t][l] * b;
                h[n * VW + l] = hv;
                acc[l] += c * hv;
            }
        }
        for (int l = 0; l < VW; l++) yt[t][l] = acc[l];
    }
}

/* One work item: batch b, channels [c0, c0 + nch) (all in group g), the whole sequence.  Always inlined
 * into one wrapper per instruction set below, which is where it gets vectorised. */
MM_INLINE void scan_block(const mm_scan_args *a, scan_scratch *restrict s, ptrdiff_t b, ptrdiff_t c0, int nch) {
    const ptrdiff_t KD = a->channels, L = a->length, N = a->d_state, G = a->groups;
    const ptrdiff_t g = c0 / (KD / G);
    const float *Bg = a->B + (b * G + g) * N * L;
    const float *Cg = a->C + (b * G + g) * N * L;
    const int n_state = (int)N;

    /* delta*A <= 0 whenever delta >= 0 (always after softplus) and A <= 0 (always in Mamba:
     * A = -exp(A_log)): then exp never overflows and the upper clamp can go. */
    int clamp_hi = !a->delta_softplus;
    for (ptrdiff_t n = 0; n < N; n++) {
        for (int l = 0; l < nch; l++) clamp_hi |= !(a->A[(c0 + l) * N + n] <= 0.0f);
    }
    for (ptrdiff_t n = 0; n < N; n++) {
        for (int l = 0; l < VW; l++) {
            s->a2[n * VW + l] = l < nch ? a->A[(c0 + l) * N + n] * 1.44269504088896341f : 0.0f;
            s->h[n * VW + l] = 0.0f;
        }
    }
    /* Padding lanes: delta = 0, delta*u = 0 -> dA = 1, h stays 0; never written back. */
    for (int l = nch; l < VW; l++) {
        for (int t = 0; t < TT; t++) {
            s->rd[l][t] = 0.0f;
            s->ru[l][t] = 0.0f;
        }
    }

    for (ptrdiff_t t0 = 0; t0 < L; t0 += TT) {
        const int tl = (L - t0) < TT ? (int)(L - t0) : TT;
        const int nsub = (tl + 15) / 16; /* 16-step sub-tiles to transpose; steps >= tl are ignored */
        /* 1. rows (contiguous in t, vectorised over t), then transposed into tiles */
        for (int l = 0; l < nch; l++) {
            const ptrdiff_t row = (b * KD + c0 + l) * L + t0;
            const float *restrict ur = a->u + row;
            const float *restrict dr = a->delta + row;
            const float bias = a->delta_bias[c0 + l];
            float *restrict rd = s->rd[l];
            float *restrict ru = s->ru[l];
            if (a->delta_softplus) {
                for (int t = 0; t < tl; t++) rd[t] = softplus20(dr[t] + bias);
            } else {
                for (int t = 0; t < tl; t++) rd[t] = dr[t] + bias;
            }
            for (int t = 0; t < tl; t++) ru[t] = rd[t] * ur[t];
        }
        for (int j = 0; j < nsub; j++) {
            transpose16(&s->dt[16 * j][0], VW, &s->rd[0][16 * j], TT);
            transpose16(&s->du[16 * j][0], VW, &s->ru[0][16 * j], TT);
        }
        /* 2. scan; N = 16 (MedMamba) gets its own copy with a constant trip count */
        if (n_state == 16 && !clamp_hi)
            scan_tile(s->h, s->a2, s->dt, s->du, s->y, Bg + t0, Cg + t0, L, tl, 16, 0);
        else if (!clamp_hi)
            scan_tile(s->h, s->a2, s->dt, s->du, s->y, Bg + t0, Cg + t0, L, tl, n_state, 0);
        else
            scan_tile(s->h, s->a2, s->dt, s->du, s->y, Bg + t0, Cg + t0, L, tl, n_state, 1);
        /* 3. tiles -> rows, y += D u */
        for (int j = 0; j < nsub; j++) transpose16(&s->ry[0][16 * j], TT, &s->y[16 * j][0], VW);
        for (int l = 0; l < nch; l++) {
            const ptrdiff_t row = (b * KD + c0 + l) * L + t0;
            const float *restrict ur = a->u + row;
            float *restrict yr = a->out + row;
            const float dd = a->D[c0 + l];
            const float *restrict ry = s->ry[l];
            for (int t = 0; t < tl; t++) yr[t] = ry[t] + dd * ur[t];
        }
    }
}

typedef void (*scan_block_fn)(const mm_scan_args *, scan_scratch *restrict, ptrdiff_t, ptrdiff_t, int);

#if MM_X86_PATHS
__attribute__((target("arch=x86-64-v4"))) static void scan_block_avx512(const mm_scan_args *a, scan_scratch *restrict s,
                                                                         ptrdiff_t b, ptrdiff_t c0, int nch) {
    scan_block(a, s, b, c0, nch);
}

__attribute__((target("arch=x86-64-v3"))) static void scan_block_avx2(const mm_scan_args *a, scan_scratch *restrict s,
                                                                       ptrdiff_t b, ptrdiff_t c0, int nch) {
    scan_block(a, s, b, c0, nch);
}
#endif

static void scan_block_baseline(const mm_scan_args *a, scan_scratch *restrict s, ptrdiff_t b, ptrdiff_t c0, int nch) {
    scan_block(a, s, b, c0, nch);
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
    if (PATHS[path].fn == scan_block_avx512) return __builtin_cpu_supports("x86-64-v4");
    if (PATHS[path].fn == scan_block_avx2) return __builtin_cpu_supports("x86-64-v3");
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
    size_t len = 0;
    if (raw != NULL) {
        while (isspace((unsigned char)*raw)) raw++;
        for (; raw[len] != '\0' && len + 1 < sizeof value; len++) value[len] = (char)tolower((unsigned char)raw[len]);
        while (len > 0 && isspace((unsigned char)value[len - 1])) len--;
    }
    value[len] = '\0';
    if (len == 0) return mm_scan_default_path();
    const int path = mm_scan_find_path(value);
    if (path < 0) {
        char names[64];
        mm_scan_path_names(names, sizeof names);
        snprintf(err, err_size, "%s='%s': this build of the CPU scan has the paths %s", MM_SCAN_ISA_ENV, value, names);
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

const char *const mm_scan_input_names[MM_SCAN_INPUTS] = {"u", "delta", "A", "B", "C", "D", "delta_bias"};

void mm_scan_shape_str(int ndim, const int64_t *dims, char *buf, size_t n) {
    size_t pos = (size_t)snprintf(buf, n, "(");
    const int shown = ndim < 8 ? ndim : 8;
    for (int i = 0; i < shown && pos < n; i++)
        pos += (size_t)snprintf(buf + pos, n - pos, i ? ", %lld" : "%lld", (long long)dims[i]);
    if (shown < ndim && pos < n) pos += (size_t)snprintf(buf + pos, n - pos, ", ...");
    if (ndim == 1 && pos < n) pos += (size_t)snprintf(buf + pos, n - pos, ",");
    if (pos < n) snprintf(buf + pos, n - pos, ")");
}

int mm_scan_check_shapes(const int ndim[MM_SCAN_INPUTS], const int64_t *const dims[MM_SCAN_INPUTS], mm_scan_args *a,
                         char *err, size_t err_size) {
    const char *const *names = mm_scan_input_names;
    char s1[128], s2[128];
    if (ndim[0] != 3) {
        mm_scan_shape_str(ndim[0], dims[0], s1, sizeof s1);
        snprintf(err, err_size, "u must be (batch, channels, length), got shape %s", s1);
        return -1;
    }
    const int64_t batch = dims[0][0], KD = dims[0][1], L = dims[0][2];
    if (ndim[1] != 3 || dims[1][0] != batch || dims[1][1] != KD || dims[1][2] != L) {
        mm_scan_shape_str(ndim[0], dims[0], s1, sizeof s1);
        mm_scan_shape_str(ndim[1], dims[1], s2, sizeof s2);
        snprintf(err, err_size, "delta must have u's shape %s, got %s", s1, s2);
        return -1;
    }
    if (ndim[2] != 2 || dims[2][0] != KD || dims[2][1] < 1) {
        mm_scan_shape_str(ndim[2], dims[2], s1, sizeof s1);
        snprintf(err, err_size, "A must be (channels=%lld, d_state), got %s", (long long)KD, s1);
        return -1;
    }
    const int64_t N = dims[2][1];
    if (ndim[3] != 4 || dims[3][0] != batch || dims[3][2] != N || dims[3][3] != L) {
        mm_scan_shape_str(ndim[3], dims[3], s1, sizeof s1);
        snprintf(err, err_size, "B must be (batch=%lld, groups, d_state=%lld, length=%lld), got %s", (long long)batch,
                 (long long)N, (long long)L, s1);
        return -1;
    }
    if (ndim[4] != 4 || dims[4][0] != batch || dims[4][1] != dims[3][1] || dims[4][2] != N || dims[4][3] != L) {
        mm_scan_shape_str(ndim[4], dims[4], s1, sizeof s1);
        snprintf(err, err_size, "C must be (batch=%lld, groups=%lld, d_state=%lld, length=%lld) like B, got %s",
                 (long long)batch, (long long)dims[3][1], (long long)N, (long long)L, s1);
        return -1;
    }
    const int64_t G = dims[3][1];
    if (G < 1 || KD % G != 0) {
        snprintf(err, err_size, "groups (%lld) must divide channels (%lld)", (long long)G, (long long)KD);
        return -1;
    }
    for (int k = 5; k <= 6; k++) {
        if (ndim[k] != 1 || dims[k][0] != KD) {
            mm_scan_shape_str(ndim[k], dims[k], s1, sizeof s1);
            snprintf(err, err_size, "%s must be (channels=%lld,), got %s", names[k], (long long)KD, s1);
            return -1;
        }
    }
    if (N > (1 << 20)) { /* the per-thread state is 2 * 16 * N floats */
        snprintf(err, err_size, "d_state %lld is too large", (long long)N);
        return -1;
    }
    a->batch = (ptrdiff_t)batch;
    a->channels = (ptrdiff_t)KD;
    a->length = (ptrdiff_t)L;
    a->groups = (ptrdiff_t)G;
    a->d_state = (ptrdiff_t)N;
    return 0;
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
    const ptrdiff_t cpg = a->groups > 0 ? a->channels / a->groups : 0;
    job->args = a;
    job->path = path;
    job->blocks_per_group = (cpg + VW - 1) / VW;
    job->blocks_per_batch = job->blocks_per_group * a->groups;
    job->total = a->length > 0 ? job->blocks_per_batch * a->batch : 0;
    atomic_init(&job->next, 0);
    atomic_init(&job->failed, 0);
}

void mm_scan_work(mm_scan_job *job) {
    /* A pool may call this once per item: a late call leaves without touching the allocator. */
    if (atomic_load_explicit(&job->next, memory_order_relaxed) >= job->total) return;
    const mm_scan_args *a = job->args;
    const scan_block_fn block = PATHS[job->path].fn;
    const ptrdiff_t cpg = a->channels / a->groups;
    scan_scratch *s = NULL;
    float *state = NULL;
    if (posix_memalign((void **)&s, 64, sizeof *s) != 0 ||
        posix_memalign((void **)&state, 64, sizeof(float) * 2 * VW * (size_t)a->d_state) != 0) {
        free(s);
        atomic_store(&job->failed, 1);
        return;
    }
    memset(s, 0, sizeof *s); /* tile steps beyond a sequence's end are transposed but never used */
    s->a2 = state;
    s->h = state + VW * a->d_state;
    const fp_mode mode = fp_mode_enter();
    for (;;) {
        long long i = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (i >= job->total) break;
        const ptrdiff_t b = (ptrdiff_t)i / job->blocks_per_batch;
        const ptrdiff_t rem = (ptrdiff_t)i % job->blocks_per_batch;
        const ptrdiff_t g = rem / job->blocks_per_group;
        const ptrdiff_t k = rem % job->blocks_per_group;
        const ptrdiff_t first = k * VW;
        const int nch = (int)((cpg - first) < VW ? (cpg - first) : VW);
        block(a, s, b, g * cpg + first, nch);
    }
    fp_mode_leave(mode);
    free(state);
    free(s);
}

/* A worker that could not allocate took no item, so the items are all done unless every worker failed. */
int mm_scan_job_status(mm_scan_job *job) {
    return atomic_load(&job->failed) && atomic_load(&job->next) < job->total ? -1 : 0;
}

static void *pthread_worker(void *job) {
    mm_scan_work((mm_scan_job *)job);
    return NULL;
}

int mm_scan_run_pthreads(const mm_scan_args *a, int path, int num_threads) {
    mm_scan_job job;
    mm_scan_job_init(&job, a, path);
    if (job.total == 0) return 0;
    if (num_threads < 1) num_threads = 1;
    if ((ptrdiff_t)num_threads > job.total) num_threads = (int)job.total;
    if (num_threads > 256) num_threads = 256;

    pthread_t tids[256];
    int started = 0;
    for (int i = 1; i < num_threads; i++) {
        if (pthread_create(&tids[started], NULL, pthread_worker, &job) == 0) started++;
        /* if a thread cannot be created, the others (and this one) simply take its work */
    }
    mm_scan_work(&job);
    for (int i = 0; i < started; i++) pthread_join(tids[i], NULL);
    return mm_scan_job_status(&job);
}
