/*
 * medmamba_edge.runtime._scan_cpu: a torch-free, multi-threaded CPU selective scan.
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
 * Threads: pthreads (not OpenMP, torch ships its own libgomp) pull work items from an atomic counter;
 * the GIL is released while computing.  Results do not depend on the thread count.
 *
 * Inputs: float32, C-contiguous buffers (buffer protocol; no numpy C API at build time).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
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

#define VW 16  /* channels per vector block */
#define TT 64  /* time steps per tile */

/* gcc >= 12 knows the x86-64-v3/v4 level names for target() and __builtin_cpu_supports(); elsewhere
 * (aarch64, clang, older gcc) the baseline path is the only one. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MM_X86_PATHS 1
#else
#define MM_X86_PATHS 0
#endif

#define MM_INLINE static inline __attribute__((always_inline))
#define MM_ALIGN __attribute__((aligned(64)))

typedef struct {
    const float *u, *delta, *A, *B, *C, *D, *delta_bias;
    float *out;
    Py_ssize_t batch, channels, length, groups, d_state;
    int delta_softplus;
} scan_args;

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

MM_INLINE void transpose16(float *restrict dst, Py_ssize_t dst_stride, const float *restrict src,
                           Py_ssize_t src_stride) {
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
                         const float *restrict Ct, Py_ssize_t L, int tl, int N, int clamp_hi) {
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
MM_INLINE void scan_block(const scan_args *a, scan_scratch *restrict s, Py_ssize_t b, Py_ssize_t c0, int nch) {
    const Py_ssize_t KD = a->channels, L = a->length, N = a->d_state, G = a->groups;
    const Py_ssize_t g = c0 / (KD / G);
    const float *Bg = a->B + (b * G + g) * N * L;
    const float *Cg = a->C + (b * G + g) * N * L;
    const int n_state = (int)N;

    /* delta*A <= 0 whenever delta >= 0 (always after softplus) and A <= 0 (always in Mamba:
     * A = -exp(A_log)): then exp never overflows and the upper clamp can go. */
    int clamp_hi = !a->delta_softplus;
    for (Py_ssize_t n = 0; n < N; n++) {
        for (int l = 0; l < nch; l++) clamp_hi |= !(a->A[(c0 + l) * N + n] <= 0.0f);
    }
    for (Py_ssize_t n = 0; n < N; n++) {
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

    for (Py_ssize_t t0 = 0; t0 < L; t0 += TT) {
        const int tl = (L - t0) < TT ? (int)(L - t0) : TT;
        const int nsub = (tl + 15) / 16; /* 16-step sub-tiles to transpose; steps >= tl are ignored */
        /* 1. rows (contiguous in t, vectorised over t), then transposed into tiles */
        for (int l = 0; l < nch; l++) {
            const Py_ssize_t row = (b * KD + c0 + l) * L + t0;
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
            const Py_ssize_t row = (b * KD + c0 + l) * L + t0;
            const float *restrict ur = a->u + row;
            float *restrict yr = a->out + row;
            const float dd = a->D[c0 + l];
            const float *restrict ry = s->ry[l];
            for (int t = 0; t < tl; t++) yr[t] = ry[t] + dd * ur[t];
        }
    }
}

typedef void (*scan_block_fn)(const scan_args *, scan_scratch *restrict, Py_ssize_t, Py_ssize_t, int);

#if MM_X86_PATHS
__attribute__((target("arch=x86-64-v4"))) static void scan_block_avx512(const scan_args *a, scan_scratch *restrict s,
                                                                         Py_ssize_t b, Py_ssize_t c0, int nch) {
    scan_block(a, s, b, c0, nch);
}

__attribute__((target("arch=x86-64-v3"))) static void scan_block_avx2(const scan_args *a, scan_scratch *restrict s,
                                                                       Py_ssize_t b, Py_ssize_t c0, int nch) {
    scan_block(a, s, b, c0, nch);
}
#endif

static void scan_block_baseline(const scan_args *a, scan_scratch *restrict s, Py_ssize_t b, Py_ssize_t c0, int nch) {
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

/* Whether this CPU (and OS: libgcc checks the XCR0 register state too) can run PATHS[i]. */
static int path_supported(int i) {
#if MM_X86_PATHS
    __builtin_cpu_init();
    if (PATHS[i].fn == scan_block_avx512) return __builtin_cpu_supports("x86-64-v4");
    if (PATHS[i].fn == scan_block_avx2) return __builtin_cpu_supports("x86-64-v3");
#else
    (void)i;
#endif
    return 1;
}

/* ---------------------------------------------------------------------------------------------
 * Threading
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    const scan_args *args;
    scan_block_fn block;
    Py_ssize_t blocks_per_group, blocks_per_batch, total;
    atomic_llong next;
    atomic_int failed;
} scan_job;

/* Flush denormals to zero (and treat denormal inputs as zero) while scanning: states decaying past
 * 2^-126 would otherwise take microcode assists on many CPUs; the values involved are < 1.2e-38. */
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

static void *scan_worker(void *arg) {
    scan_job *job = (scan_job *)arg;
    const scan_args *a = job->args;
    const Py_ssize_t cpg = a->channels / a->groups;
    scan_scratch *s = NULL;
    float *state = NULL;
    if (posix_memalign((void **)&s, 64, sizeof *s) != 0 ||
        posix_memalign((void **)&state, 64, sizeof(float) * 2 * VW * (size_t)a->d_state) != 0) {
        free(s);
        atomic_store(&job->failed, 1);
        return NULL;
    }
    memset(s, 0, sizeof *s); /* tile steps beyond a sequence's end are transposed but never used */
    s->a2 = state;
    s->h = state + VW * a->d_state;
    const fp_mode mode = fp_mode_enter();
    for (;;) {
        long long i = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (i >= job->total) break;
        const Py_ssize_t b = (Py_ssize_t)i / job->blocks_per_batch;
        const Py_ssize_t rem = (Py_ssize_t)i % job->blocks_per_batch;
        const Py_ssize_t g = rem / job->blocks_per_group;
        const Py_ssize_t k = rem % job->blocks_per_group;
        const Py_ssize_t first = k * VW;
        const int nch = (int)((cpg - first) < VW ? (cpg - first) : VW);
        job->block(a, s, b, g * cpg + first, nch);
    }
    fp_mode_leave(mode);
    free(state);
    free(s);
    return NULL;
}

/* Returns 0 on success, -1 if memory for the scratch could not be allocated. */
static int run_scan(const scan_args *a, scan_block_fn block, int num_threads) {
    if (a->batch == 0 || a->channels == 0 || a->length == 0) return 0;
    scan_job job;
    const Py_ssize_t cpg = a->channels / a->groups;
    job.args = a;
    job.block = block;
    job.blocks_per_group = (cpg + VW - 1) / VW;
    job.blocks_per_batch = job.blocks_per_group * a->groups;
    job.total = job.blocks_per_batch * a->batch;
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, 0);

    if (num_threads < 1) num_threads = 1;
    if ((Py_ssize_t)num_threads > job.total) num_threads = (int)job.total;
    if (num_threads > 256) num_threads = 256;

    pthread_t tids[256];
    int started = 0;
    for (int i = 1; i < num_threads; i++) {
        if (pthread_create(&tids[started], NULL, scan_worker, &job) == 0) started++;
        /* if a thread cannot be created, the others (and this one) simply take its work */
    }
    scan_worker(&job);
    for (int i = 0; i < started; i++) pthread_join(tids[i], NULL);
    /* a worker that failed to allocate took no items; this thread's own worker finishing means all
     * items were taken unless every worker failed */
    if (atomic_load(&job.failed) && atomic_load(&job.next) < job.total) return -1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Python glue
 * ------------------------------------------------------------------------------------------- */

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

static void shape_str(const Py_buffer *v, char *buf, size_t n) {
    size_t pos = 0;
    pos += (size_t)snprintf(buf + pos, n - pos, "(");
    for (int i = 0; i < v->ndim && pos < n; i++)
        pos += (size_t)snprintf(buf + pos, n - pos, i ? ", %zd" : "%zd", v->shape[i]);
    if (v->ndim == 1 && pos < n) pos += (size_t)snprintf(buf + pos, n - pos, ",");
    if (pos < n) snprintf(buf + pos, n - pos, ")");
}

static const char *const ARG_NAMES[8] = {"u", "delta", "A", "B", "C", "D", "delta_bias", "out"};

/* The index in PATHS of the path called `name`; -1 with ValueError set if none is. */
static int find_path(const char *name) {
    for (int i = 0; i < N_PATHS; i++) {
        if (strcmp(PATHS[i].name, name) == 0) return i;
    }
    char names[64] = "";
    for (int i = 0; i < N_PATHS; i++) {
        if (i) strcat(names, ", ");
        strcat(names, PATHS[i].name);
    }
    PyErr_Format(PyExc_ValueError, "unknown scan path '%s'; this build has %s", name, names);
    return -1;
}

/* The path a call runs: `name`, refused (RuntimeError) if this CPU cannot run it, or by default the
 * widest this CPU supports. */
static scan_block_fn choose_path(const char *name) {
    if (name == NULL) {
        for (int i = 0; i < N_PATHS; i++) {
            if (path_supported(i)) return PATHS[i].fn;
        }
    }
    int i = find_path(name);
    if (i < 0) return NULL;
    if (!path_supported(i)) {
        PyErr_Format(PyExc_RuntimeError, "this CPU cannot run the '%s' scan path", name);
        return NULL;
    }
    return PATHS[i].fn;
}

static PyObject *py_cpu_supports(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    int i = find_path(name);
    if (i < 0) return NULL;
    return PyBool_FromLong(path_supported(i));
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
    const scan_block_fn block = choose_path(isa);
    if (block == NULL) return NULL;

    Py_buffer v[8];
    int got = 0;
    PyObject *result = NULL;
    char s1[128], s2[128];

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

    const Py_buffer *u = &v[0], *dl = &v[1], *A = &v[2], *B = &v[3], *C = &v[4], *D = &v[5], *db = &v[6],
                    *out = &v[7];
    if (u->ndim != 3) {
        shape_str(u, s1, sizeof s1);
        PyErr_Format(PyExc_ValueError, "selective_scan: u must be (batch, channels, length), got shape %s", s1);
        goto done;
    }
    const Py_ssize_t batch = u->shape[0], KD = u->shape[1], L = u->shape[2];
    for (int k = 1; k < 8; k += 6) { /* delta and out have u's shape */
        const Py_buffer *w = &v[k];
        if (w->ndim != 3 || w->shape[0] != batch || w->shape[1] != KD || w->shape[2] != L) {
            shape_str(u, s1, sizeof s1);
            shape_str(w, s2, sizeof s2);
            PyErr_Format(PyExc_ValueError, "selective_scan: %s must have u's shape %s, got %s", ARG_NAMES[k], s1,
                         s2);
            goto done;
        }
    }
    (void)dl;
    if (A->ndim != 2 || A->shape[0] != KD || A->shape[1] < 1) {
        shape_str(A, s1, sizeof s1);
        PyErr_Format(PyExc_ValueError, "selective_scan: A must be (channels=%zd, d_state), got %s", KD, s1);
        goto done;
    }
    const Py_ssize_t N = A->shape[1];
    for (int k = 3; k <= 4; k++) {
        const Py_buffer *w = &v[k];
        if (w->ndim != 4 || w->shape[0] != batch || w->shape[2] != N || w->shape[3] != L ||
            (k == 4 && w->shape[1] != B->shape[1])) {
            shape_str(w, s1, sizeof s1);
            PyErr_Format(PyExc_ValueError,
                         "selective_scan: %s must be (batch=%zd, groups, d_state=%zd, length=%zd)%s, got %s",
                         ARG_NAMES[k], batch, N, L, k == 4 ? " like B" : "", s1);
            goto done;
        }
    }
    const Py_ssize_t G = B->shape[1];
    if (G < 1 || KD % G != 0) {
        PyErr_Format(PyExc_ValueError, "selective_scan: groups (%zd) must divide channels (%zd)", G, KD);
        goto done;
    }
    for (int k = 5; k <= 6; k++) {
        const Py_buffer *w = &v[k];
        if (w->ndim != 1 || w->shape[0] != KD) {
            shape_str(w, s1, sizeof s1);
            PyErr_Format(PyExc_ValueError, "selective_scan: %s must be (channels=%zd,), got %s", ARG_NAMES[k], KD,
                         s1);
            goto done;
        }
    }
    if (N > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "selective_scan: d_state %zd is too large", N);
        goto done;
    }

    scan_args sa = {
        .u = (const float *)u->buf, .delta = (const float *)v[1].buf, .A = (const float *)A->buf,
        .B = (const float *)B->buf, .C = (const float *)C->buf, .D = (const float *)D->buf,
        .delta_bias = (const float *)db->buf, .out = (float *)out->buf,
        .batch = batch, .channels = KD, .length = L, .groups = G, .d_state = N,
        .delta_softplus = delta_softplus,
    };
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_scan(&sa, block, num_threads);
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
    PyObject *isas = PyTuple_New(N_PATHS);
    if (isas == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < N_PATHS; i++) {
        PyObject *name = PyUnicode_FromString(PATHS[i].name);
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
    if (PyModule_AddIntConstant(m, "BLOCK_CHANNELS", VW) < 0 || PyModule_AddIntConstant(m, "TILE_STEPS", TT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
