/* mmf native CPU kernel: the BitLinear inference form on i2-packed ternary weights.
 *
 * Torch-free C, built at first use by mmf/kernels/cpu_ternary.py (gcc, a per-user cache) and called
 * through ctypes on tensors' data pointers. What it computes is kernels.reference.bitlinear_i2:
 *
 *   xn = rmsnorm(x) * norm_w                      fp32, eps as given (BITLINEAR_NORM_EPS)
 *   s_x = 127 / max(amax|xn|, 1e-5)               per token
 *   xq = clamp(round_half_even(xn * s_x), -128, 127)
 *   acc[m, n] = sum_k w[n, k] * xq[m, k]          exact int32 (w in {-1, 0, 1})
 *   y = (float)acc / (s_x * s_w)  (+ bias)        fp32
 *
 * The float prologue repeats torch's operations in torch's order (the sum of squares follows ATen's
 * cascade_sum with the lane count the Python side measured; s_x = reciprocal(amax) * 127 as torch's
 * `127 / t` does), so the quantised activations, and hence y, are normally bit-identical to the
 * reference. Build with -ffp-contract=off: a fused multiply-add there would change the roundings.
 *
 * i2 layout (docs/formats.md): with P = ceil(K / 4) bytes per row, byte j of row n holds the code
 * (w + 1 in {0, 1, 2}) of element k = s * P + j in bits 2s..2s+1; padding elements hold code 1.
 * A run of bytes j..j+63 therefore expands (shift by 0/2/4/6, AND 3) into four u8 vectors that pair
 * with four contiguous slices of the activations, x[s * P + j ..]. Activations are quantised into a
 * buffer of four slices of Pp = roundup(P, 64) int8 each (zero padded), the u8 codes times s8
 * activations are summed with vpdpbusd (AVX-512 VNNI / AVX-VNNI) or maddubs + madd (AVX2), giving
 * sum (w + 1) x; subtracting sum x gives the exact sum w x.
 *
 * Threads: a small persistent pthread pool (no OpenMP: a second OpenMP runtime beside torch's slows
 * both), workers spin briefly after a job, then sleep on a condition variable. Threads take chunks of
 * output rows from a shared counter; every output is computed by one thread in one order, so results
 * do not depend on the thread count or on which thread took which chunk.
 */

#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MMF_X86 1
#else
#define MMF_X86 0
#endif

#if MMF_X86 && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define MMF_HAVE_AVXVNNI 1
#else
#define MMF_HAVE_AVXVNNI 0
#endif

#define MMF_EXPORT __attribute__((visibility("default")))
#define MMF_ABI_VERSION 3

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVXVNNI = 2, ISA_AVX512VNNI = 3, ISA_COUNT = 4 };

/* error codes returned by the entry points (the Python wrapper checks everything first) */
enum { MMF_OK = 0, MMF_EARG = -1, MMF_ENOMEM = -2, MMF_EISA = -3 };

#define RMAX 4 /* weight rows per micro-kernel call */
#define TMAX 4 /* tokens per micro-kernel call */
#define MAX_THREADS 256

static inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------------------------------------
 * Micro-kernels: out[r * TMAX + t] = sum_{j < P} sum_s code_s(w[r * ws + j]) * x[t * xs + s * Pp + j]
 * for r < R, t < T. Codes are read as unsigned 2-bit fields; x is a quantised activation buffer.
 *
 * Each body is an always-inline function of constant R, T (and S, independent accumulator chains
 * per output) called from a wrapper that owns accumulator arrays of exactly R * T * S vectors: with
 * the loops unrolled, gcc keeps them in registers (arrays sized for the largest tile stay in memory).
 * ---------------------------------------------------------------------------------------------- */

typedef void (*mk_fn)(const uint8_t *w, int64_t ws, const int8_t *x, int64_t xs, int64_t P, int64_t Pp,
                      int32_t *out);

static inline __attribute__((always_inline)) void mk_scalar(const int R, const int T, const uint8_t *w, int64_t ws,
                                                            const int8_t *x, int64_t xs, int64_t P, int64_t Pp,
                                                            int32_t *out) {
    for (int r = 0; r < R; r++) {
        const uint8_t *wr = w + r * ws;
        for (int t = 0; t < T; t++) {
            const int8_t *x0 = x + t * xs, *x1 = x0 + Pp, *x2 = x1 + Pp, *x3 = x2 + Pp;
            int32_t acc = 0;
            for (int64_t j = 0; j < P; j++) {
                unsigned b = wr[j];
                acc += (int32_t)(b & 3) * x0[j] + (int32_t)((b >> 2) & 3) * x1[j] +
                       (int32_t)((b >> 4) & 3) * x2[j] + (int32_t)(b >> 6) * x3[j];
            }
            out[r * TMAX + t] = acc;
        }
    }
}
#define MK_DEF_SCALAR(R, T)                                                                                 \
    static __attribute__((noinline)) void mk_scalar_##R##_##T(const uint8_t *w, int64_t ws, const int8_t *x,  \
                                                              int64_t xs, int64_t P, int64_t Pp, int32_t *out) { \
        mk_scalar(R, T, w, ws, x, xs, P, Pp, out);                                                          \
    }

#if MMF_X86

/* ---- AVX-512 VNNI: 64 bytes (256 weights) per step, vpdpbusd on zmm, masked tail load ---- */
/* Software prefetch of the next row block's bytes at the same column (R rows ahead; a prefetch past
 * the end of the weights is harmless on x86): measured on this machine's 13b shapes, 2 threads,
 * 250.6 -> 205.7 ms per token of projections (none / 1 block ahead; 2 blocks ahead 237.8). The
 * hardware prefetchers alone do not keep R short row streams fed. */
#define MMF_PF_BLOCKS 1
#define TGT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))

static inline __attribute__((always_inline)) TGT_AVX512 void
avx512_step(const int R, const int T, const int S, __m512i *acc, const uint8_t *w, int64_t ws, const int8_t *x,
            int64_t xs, int64_t Pp, int64_t j, __mmask64 mask, int full) {
    /* slice-major: R weight vectors, then per slice T activation vectors and one code vector at a
     * time, so R*T accumulators + T + R + 2 registers stay live (the token-major order kept all 4T
     * activation vectors and 4 code vectors live and spilled at 4 x 4) */
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i wv[RMAX];
    for (int r = 0; r < R; r++) {
        _mm_prefetch((const char *)(w + (r + R * MMF_PF_BLOCKS) * ws + j), _MM_HINT_T0);
        wv[r] = full ? _mm512_loadu_si512((const void *)(w + r * ws + j))
                     : _mm512_maskz_loadu_epi8(mask, w + r * ws + j);
    }
    for (int s = 0; s < 4; s++) {
        __m512i xv[TMAX];
        for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_si512((const void *)(x + t * xs + s * Pp + j));
        for (int r = 0; r < R; r++) {
            const __m512i c = _mm512_and_si512(s ? _mm512_srli_epi16(wv[r], 2 * s) : wv[r], m3);
            for (int t = 0; t < T; t++) {
                __m512i *a = &acc[(r * T + t) * S + s % S];
                *a = _mm512_dpbusd_epi32(*a, c, xv[t]);
            }
        }
    }
}

static inline __attribute__((always_inline)) TGT_AVX512 void
mk_avx512(const int R, const int T, const int S, __m512i *acc, const uint8_t *w, int64_t ws, const int8_t *x,
          int64_t xs, int64_t P, int64_t Pp, int32_t *out) {
    for (int i = 0; i < R * T * S; i++) acc[i] = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + 64 <= P; j += 64) avx512_step(R, T, S, acc, w, ws, x, xs, Pp, j, 0, 1);
    if (j < P) avx512_step(R, T, S, acc, w, ws, x, xs, Pp, j, ((__mmask64)1 << (P - j)) - 1, 0);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            __m512i a = acc[(r * T + t) * S];
            for (int s = 1; s < S; s++) a = _mm512_add_epi32(a, acc[(r * T + t) * S + s]);
            out[r * TMAX + t] = _mm512_reduce_add_epi32(a);
        }
}
/* one accumulator per output, but one per slice for a tile of one row and one token. Decode (one
 * token) runs that tile: each thread reads its rows as one sequential stream. Measured on this
 * machine (weights from DRAM, 2 threads): 13b shapes 18-20 -> 22-26 GB/s, 1.3b shapes 11-17 -> 15-20
 * GB/s, against 4 rows x 1 token (4 interleaved streams a row apart, which the hardware prefetchers
 * and one software prefetch did not keep fed); in L2, 4 rows x 1 token ran at 137 G weights/s with
 * one chain per row, 75 with one chain per slice (more registers, spills) */
#define MK_DEF_AVX512(R, T)                                                                                 \
    static TGT_AVX512 __attribute__((noinline)) void mk_avx512_##R##_##T(                                  \
        const uint8_t *w, int64_t ws, const int8_t *x, int64_t xs, int64_t P, int64_t Pp, int32_t *out) {   \
        __m512i acc[(R) * (T) * ((R) * (T) == 1 ? 4 : 1)];                                                  \
        mk_avx512(R, T, (R) * (T) == 1 ? 4 : 1, acc, w, ws, x, xs, P, Pp, out);                            \
    }

/* ---- AVX2 (and AVX-VNNI): 32 bytes (128 weights) per step; a tail shorter than 32 bytes is
 * copied into a zeroed stack buffer (AVX2 has no byte-masked load; zero bytes are code 0). ---- */
#define TGT_AVX2 __attribute__((target("avx2")))

static inline __attribute__((always_inline)) TGT_AVX2 int32_t hsum256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* One 32-byte step of AVX2: per (row, token) the int16 sum of four maddubs. Each maddubs lane is
 * c * x + c' * x' with codes <= 2 and |x| <= 128, so |lane| <= 512 and the step adds <= 2048:
 * 16 steps stay within int16 (16 * 2048 = 32768, and -32768 is representable; 16 * 2032 = 32512). */
#define AVX2_STEPS 16

static inline __attribute__((always_inline)) TGT_AVX2 void
avx2_step(const int R, const int T, __m256i *acc16, const uint8_t *w, int64_t ws, const int8_t *x, int64_t xs,
          int64_t Pp, int64_t j) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int r = 0; r < R; r++) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * ws));
        const __m256i c0 = _mm256_and_si256(wv, m3);
        const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), m3);
        const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m3);
        const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), m3);
        for (int t = 0; t < T; t++) {
            const int8_t *xt = x + t * xs + j;
            const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)xt)),
                                                 _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(xt + Pp))));
            const __m256i p23 = _mm256_add_epi16(
                _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i *)(xt + 2 * Pp))),
                _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i *)(xt + 3 * Pp))));
            acc16[r * T + t] = _mm256_add_epi16(acc16[r * T + t], _mm256_add_epi16(p01, p23));
        }
    }
}

static inline __attribute__((always_inline)) TGT_AVX2 void
avx2_widen(const int R, const int T, __m256i *acc16, __m256i *acc32) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < R * T; i++) {
        acc32[i] = _mm256_add_epi32(acc32[i], _mm256_madd_epi16(acc16[i], ones));
        acc16[i] = _mm256_setzero_si256();
    }
}

/* the last P % 32 bytes of R rows, zero-filled to 32 (rows ws apart) -> tail (rows 32 apart) */
static inline __attribute__((always_inline)) void copy_tail(const int R, const uint8_t *w, int64_t ws, int64_t j,
                                                            int64_t P, uint8_t *tail) {
    memset(tail, 0, (size_t)(32 * R));
    for (int r = 0; r < R; r++) memcpy(tail + 32 * r, w + r * ws + j, (size_t)(P - j));
}

static inline __attribute__((always_inline)) TGT_AVX2 void
mk_avx2(const int R, const int T, __m256i *acc16, __m256i *acc32, const uint8_t *w, int64_t ws, const int8_t *x,
        int64_t xs, int64_t P, int64_t Pp, int32_t *out) {
    for (int i = 0; i < R * T; i++) acc32[i] = acc16[i] = _mm256_setzero_si256();
    const int64_t jt = P / 32 * 32;
    for (int64_t j = 0; j < jt;) {
        const int64_t jend = min64(jt, j + 32 * AVX2_STEPS);
        for (; j < jend; j += 32) avx2_step(R, T, acc16, w + j, ws, x, xs, Pp, j);
        avx2_widen(R, T, acc16, acc32);
    }
    if (jt < P) {
        uint8_t tail[RMAX * 32];
        copy_tail(R, w, ws, jt, P, tail);
        avx2_step(R, T, acc16, tail, 32, x, xs, Pp, jt);
        avx2_widen(R, T, acc16, acc32);
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[r * TMAX + t] = hsum256(acc32[r * T + t]);
}
#define MK_DEF_AVX2(R, T)                                                                                   \
    static TGT_AVX2 __attribute__((noinline)) void mk_avx2_##R##_##T(                                      \
        const uint8_t *w, int64_t ws, const int8_t *x, int64_t xs, int64_t P, int64_t Pp, int32_t *out) {   \
        __m256i acc16[(R) * (T)], acc32[(R) * (T)];                                                         \
        mk_avx2(R, T, acc16, acc32, w, ws, x, xs, P, Pp, out);                                              \
    }

#if MMF_HAVE_AVXVNNI
#define TGT_AVXVNNI __attribute__((target("avx2,avxvnni")))

static inline __attribute__((always_inline)) TGT_AVXVNNI void
avxvnni_step(const int R, const int T, const int S, __m256i *acc, const uint8_t *w, int64_t ws, const int8_t *x,
             int64_t xs, int64_t Pp, int64_t j) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int r = 0; r < R; r++) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * ws));
        __m256i c[4];
        c[0] = _mm256_and_si256(wv, m3);
        c[1] = _mm256_and_si256(_mm256_srli_epi16(wv, 2), m3);
        c[2] = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m3);
        c[3] = _mm256_and_si256(_mm256_srli_epi16(wv, 6), m3);
        for (int t = 0; t < T; t++)
            for (int s = 0; s < 4; s++) {
                __m256i *a = &acc[(r * T + t) * S + s % S];
                *a = _mm256_dpbusd_avx_epi32(*a, c[s], _mm256_loadu_si256((const __m256i *)(x + t * xs + s * Pp + j)));
            }
    }
}

static inline __attribute__((always_inline)) TGT_AVXVNNI void
mk_avxvnni(const int R, const int T, const int S, __m256i *acc, const uint8_t *w, int64_t ws, const int8_t *x,
           int64_t xs, int64_t P, int64_t Pp, int32_t *out) {
    for (int i = 0; i < R * T * S; i++) acc[i] = _mm256_setzero_si256();
    const int64_t jt = P / 32 * 32;
    for (int64_t j = 0; j < jt; j += 32) avxvnni_step(R, T, S, acc, w + j, ws, x, xs, Pp, j);
    if (jt < P) {
        uint8_t tail[RMAX * 32];
        copy_tail(R, w, ws, jt, P, tail);
        avxvnni_step(R, T, S, acc, tail, 32, x, xs, Pp, jt);
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            __m256i a = acc[(r * T + t) * S];
            for (int s = 1; s < S; s++) a = _mm256_add_epi32(a, acc[(r * T + t) * S + s]);
            out[r * TMAX + t] = hsum256(a);
        }
}
/* as AVX-512: one accumulator per output (a tile of one row and token: one per slice) */
#define MK_DEF_AVXVNNI(R, T)                                                                                \
    static TGT_AVXVNNI __attribute__((noinline)) void mk_avxvnni_##R##_##T(                                \
        const uint8_t *w, int64_t ws, const int8_t *x, int64_t xs, int64_t P, int64_t Pp, int32_t *out) {   \
        __m256i acc[(R) * (T) * ((R) * (T) == 1 ? 4 : 1)];                                                  \
        mk_avxvnni(R, T, (R) * (T) == 1 ? 4 : 1, acc, w, ws, x, xs, P, Pp, out);                            \
    }
#endif /* MMF_HAVE_AVXVNNI */
#endif /* MMF_X86 */

/* One function per (ISA, R, T) that the schedule uses: the full tile, and the tiles of one row for
 * the last rows of a block. Fewer instances keep the first-use build short. */
MK_DEF_SCALAR(1, 1) MK_DEF_SCALAR(1, 2) MK_DEF_SCALAR(2, 1) MK_DEF_SCALAR(2, 2)
static const mk_fn MK_SCALAR[RMAX][TMAX] = {{mk_scalar_1_1, mk_scalar_1_2}, {mk_scalar_2_1, mk_scalar_2_2}};
#if MMF_X86
MK_DEF_AVX512(1, 1) MK_DEF_AVX512(1, 2) MK_DEF_AVX512(1, 3) MK_DEF_AVX512(1, 4)
MK_DEF_AVX512(4, 1) MK_DEF_AVX512(4, 2) MK_DEF_AVX512(4, 3) MK_DEF_AVX512(4, 4)
static const mk_fn MK_AVX512[RMAX][TMAX] = {{mk_avx512_1_1, mk_avx512_1_2, mk_avx512_1_3, mk_avx512_1_4},
                                            {NULL},
                                            {NULL},
                                            {mk_avx512_4_1, mk_avx512_4_2, mk_avx512_4_3, mk_avx512_4_4}};
MK_DEF_AVX2(1, 1) MK_DEF_AVX2(1, 2) MK_DEF_AVX2(2, 1) MK_DEF_AVX2(2, 2) MK_DEF_AVX2(4, 1)
static const mk_fn MK_AVX2[RMAX][TMAX] = {{mk_avx2_1_1, mk_avx2_1_2}, {mk_avx2_2_1, mk_avx2_2_2}, {NULL},
                                          {mk_avx2_4_1}};
#if MMF_HAVE_AVXVNNI
MK_DEF_AVXVNNI(1, 1) MK_DEF_AVXVNNI(1, 2) MK_DEF_AVXVNNI(2, 1) MK_DEF_AVXVNNI(2, 2) MK_DEF_AVXVNNI(4, 1)
static const mk_fn MK_AVXVNNI[RMAX][TMAX] = {{mk_avxvnni_1_1, mk_avxvnni_1_2}, {mk_avxvnni_2_1, mk_avxvnni_2_2},
                                             {NULL}, {mk_avxvnni_4_1}};
#endif
#endif

static const mk_fn (*mk_table(int isa))[TMAX] {
    switch (isa) {
#if MMF_X86
    case ISA_AVX512VNNI: return MK_AVX512;
    case ISA_AVX2: return MK_AVX2;
#if MMF_HAVE_AVXVNNI
    case ISA_AVXVNNI: return MK_AVXVNNI;
#endif
#endif
    default: return MK_SCALAR;
    }
}

/* the full tile (rows x tokens) of each path: zmm has 32 registers, ymm 16; the table above holds
 * (R, t) and (1, t) for t <= T */
static void tile_shape(int isa, int64_t M, int *R, int *T) {
    if (isa == ISA_AVX512VNNI) { /* decode: one row at a time, a sequential stream (see MK_DEF_AVX512) */
        *R = M == 1 ? 1 : 4;
        *T = M >= 4 ? 4 : (int)M;
    } else if (isa == ISA_SCALAR) {
        *R = 2;
        *T = M >= 2 ? 2 : 1;
    } else {
        *R = M >= 2 ? 2 : 1; /* decode: one sequential row stream per thread; AVX2, 13b and 1.3b shapes
                               * from DRAM, 2 threads: 9-13 -> 16-21 GB/s against 4 rows */
        *T = M >= 2 ? 2 : 1;
    }
}

/* ------------------------------------------------------------------------------------------------
 * CPU features
 * ---------------------------------------------------------------------------------------------- */

MMF_EXPORT int mmf_cpu_abi_version(void) { return MMF_ABI_VERSION; }

MMF_EXPORT int mmf_cpu_isa_supported(int isa) {
#if MMF_X86
    __builtin_cpu_init();
    switch (isa) {
    case ISA_SCALAR: return 1;
    case ISA_AVX2: return __builtin_cpu_supports("avx2") != 0;
    case ISA_AVXVNNI:
#if MMF_HAVE_AVXVNNI
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
#else
        return 0;
#endif
    case ISA_AVX512VNNI:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
    default: return 0;
    }
#else
    return isa == ISA_SCALAR;
#endif
}

MMF_EXPORT int mmf_cpu_best_isa(void) {
    for (int isa = ISA_COUNT - 1; isa > 0; isa--)
        if (mmf_cpu_isa_supported(isa)) return isa;
    return ISA_SCALAR;
}

/* ------------------------------------------------------------------------------------------------
 * Thread pool. A job is nchunks independent chunks; the caller and the workers take chunk indices
 * from one atomic counter until none is left, so a worker that the OS has not scheduled (a loaded or
 * oversubscribed machine) delays nothing: the caller does its share. The caller then closes the job
 * and waits only for workers inside it (`active`), never for workers that did not come.
 * ---------------------------------------------------------------------------------------------- */

typedef void (*chunk_fn)(void *ctx, int64_t chunk);

static struct {
    pthread_mutex_t call_lock; /* one call at a time (scratch buffers and the job are shared) */
    pthread_mutex_t lock;      /* sleeping and waking */
    pthread_cond_t wake, done;
    int nworkers;
    _Atomic unsigned gen;     /* job generation */
    _Atomic int open;         /* the current job admits workers */
    _Atomic int active;       /* workers inside a job */
    _Atomic int sleepers;     /* workers waiting on `wake` */
    _Atomic int main_waiting; /* the caller sleeps on `done` */
    _Atomic int64_t next;     /* the next chunk to take */
    chunk_fn fn;
    void *ctx;
    int64_t nchunks;
    int nth;
    long spin_ns;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, NULL, NULL, 0, 1, 100000};

static inline void cpu_relax(void) {
#if MMF_X86
    _mm_pause();
#else
    sched_yield();
#endif
}

static inline long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void take_chunks(void) {
    for (;;) {
        const int64_t c = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed);
        if (c >= pool.nchunks) return;
        pool.fn(pool.ctx, c);
    }
}

typedef struct {
    int tid;
    unsigned gen; /* the generation before the worker's first job (it may start after that job's) */
} worker_arg;

static void *worker_main(void *arg) {
    const int tid = ((worker_arg *)arg)->tid;
    unsigned seen = ((worker_arg *)arg)->gen;
    free(arg);
    for (;;) {
        unsigned g = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (g == seen) { /* spin a while: the next call usually follows within microseconds */
            const long until = now_ns() + pool.spin_ns;
            for (int i = 0; (g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen; i++) {
                cpu_relax();
                if ((i & 255) == 255 && now_ns() > until) break;
            }
        }
        if (g == seen) { /* then sleep (sleepers is raised before the check: no lost wake-up) */
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = g;
        /* enter, then check that job g is still open (seq_cst: the caller closes, then reads active) */
        atomic_fetch_add(&pool.active, 1);
        if (atomic_load(&pool.open) && atomic_load(&pool.gen) == g && tid < pool.nth) take_chunks();
        if (atomic_fetch_sub(&pool.active, 1) == 1 && atomic_load(&pool.main_waiting)) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return NULL;
}

static void pool_after_fork_child(void) {
    /* the workers do not exist in a forked child: start afresh */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    pool.call_lock = m;
    pool.lock = m;
    pool.wake = c;
    pool.done = c;
    pool.nworkers = 0;
    atomic_store(&pool.open, 0);
    atomic_store(&pool.active, 0);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.main_waiting, 0);
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_init_once(void) {
    const char *s = getenv("MMF_CPU_SPIN_US");
    if (s && *s) pool.spin_ns = atol(s) * 1000L;
    pthread_atfork(NULL, NULL, pool_after_fork_child);
}

/* run fn(ctx, c) for c < nchunks on up to nth threads (the caller included); call with call_lock held */
static void pool_run(chunk_fn fn, void *ctx, int64_t nchunks, int nth) {
    if (nth > nchunks) nth = (int)nchunks;
    if (nth > MAX_THREADS) nth = MAX_THREADS;
    while (pool.nworkers < nth - 1) {
        pthread_t th;
        pthread_attr_t attr;
        worker_arg *wa = (worker_arg *)malloc(sizeof(worker_arg));
        if (!wa) break;
        wa->tid = pool.nworkers + 1;
        wa->gen = atomic_load(&pool.gen);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&th, &attr, worker_main, wa) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) {
            free(wa);
            break;
        }
        pool.nworkers++;
    }
    if (nth > pool.nworkers + 1) nth = pool.nworkers + 1;
    if (nth <= 1) {
        for (int64_t c = 0; c < nchunks; c++) fn(ctx, c);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nchunks = nchunks;
    pool.nth = nth;
    atomic_store(&pool.next, 0);
    atomic_store(&pool.open, 1);
    atomic_fetch_add(&pool.gen, 1); /* seq_cst: pairs with the workers' sleepers count */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    take_chunks();
    atomic_store(&pool.open, 0); /* workers that have not entered yet will not */
    const long until = now_ns() + pool.spin_ns;
    for (int i = 0; atomic_load(&pool.active) != 0; i++) { /* those inside finish their last chunk */
        cpu_relax();
        if ((i & 255) == 255 && now_ns() > until) {
            pthread_mutex_lock(&pool.lock);
            atomic_store(&pool.main_waiting, 1);
            while (atomic_load(&pool.active) != 0) pthread_cond_wait(&pool.done, &pool.lock);
            atomic_store(&pool.main_waiting, 0);
            pthread_mutex_unlock(&pool.lock);
            break;
        }
    }
}

static void call_begin(void) {
    pthread_once(&pool_once, pool_init_once);
    pthread_mutex_lock(&pool.call_lock);
}
static void call_end(void) { pthread_mutex_unlock(&pool.call_lock); }

/* ------------------------------------------------------------------------------------------------
 * Scratch (grown as needed; used under call_lock)
 * ---------------------------------------------------------------------------------------------- */

static struct {
    void *buf;
    size_t size;
} scratch;

static void *scratch_get(size_t size) {
    if (size > scratch.size) {
        free(scratch.buf);
        scratch.size = 0;
        scratch.buf = aligned_alloc(64, (size_t)round_up((int64_t)size, 64));
        if (!scratch.buf) return NULL;
        scratch.size = size;
    }
    return scratch.buf;
}

/* ------------------------------------------------------------------------------------------------
 * Activation prologue, in torch's order
 * ---------------------------------------------------------------------------------------------- */

static int sum_lanes = 8; /* Vectorized<float>::size() of the kernel ATen's sum runs (set from Python) */

MMF_EXPORT int mmf_cpu_set_sum_lanes(int lanes) {
    if (lanes != 1 && lanes != 4 && lanes != 8 && lanes != 16) return MMF_EARG;
    sum_lanes = lanes;
    return MMF_OK;
}

static int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll((unsigned long long)(x - 1)); }

/* at::native::row_sum over nvec vectors of W lanes (cascade_sum's multi_row_sum with 4 rows and 4
 * levels), of the squares of x: lanes[l] receives the lane sums. W is a constant in each caller, so
 * the lane loops vectorise; lane-wise adds in the same order are exactly torch's vector adds. */
static inline __attribute__((always_inline)) void torch_row_sum_sq(const float *x, const int W, int64_t nvec,
                                                                   float lanes[16]) {
    float acc[4][4][16];
    memset(acc, 0, sizeof(acc));
    const int64_t size = nvec / 4;
    int64_t lp = ceil_log2(size) / 4;
    if (lp < 4) lp = 4;
    const int64_t step = (int64_t)1 << lp, mask = step - 1;
    int64_t i = 0;
#define ADD_GROUP(dst, gi)                                                      \
    for (int k = 0; k < 4; k++)                                                 \
        for (int l = 0; l < W; l++) {                                           \
            const float v = x[((gi) * 4 + k) * W + l];                          \
            dst[k][l] += v * v;                                                 \
        }
    for (; i + step <= size;) {
        for (int64_t j = 0; j < step; ++j, ++i) { ADD_GROUP(acc[0], i) }
        for (int lv = 1; lv < 4; ++lv) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < W; l++) {
                    acc[lv][k][l] += acc[lv - 1][k][l];
                    acc[lv - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (lv * lp))) != 0) break;
        }
    }
    for (; i < size; ++i) { ADD_GROUP(acc[0], i) }
#undef ADD_GROUP
    for (int lv = 1; lv < 4; ++lv)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < W; l++) acc[0][k][l] += acc[lv][k][l];
    for (int64_t v = size * 4; v < nvec; ++v)
        for (int l = 0; l < W; l++) {
            const float e = x[v * W + l];
            acc[0][0][l] += e * e;
        }
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < W; l++) acc[0][0][l] += acc[0][k][l];
    for (int l = 0; l < W; l++) lanes[l] = acc[0][0][l];
}

/* vectorized_inner_sum: W-lane row sum, then the scalar tail, then the lanes one by one */
static inline __attribute__((always_inline)) float torch_inner_sum_sq(const float *x, int64_t K, const int W) {
    float lanes[16];
    const int64_t nvec = K / W;
    torch_row_sum_sq(x, W, nvec, lanes);
    float acc = 0.0f;
    for (int64_t k = nvec * W; k < K; k++) acc += x[k] * x[k];
    for (int l = 0; l < W; l++) acc += lanes[l];
    return acc;
}

static __attribute__((noinline)) float sum_sq_w4(const float *x, int64_t K) { return torch_inner_sum_sq(x, K, 4); }
static __attribute__((noinline)) float sum_sq_w8(const float *x, int64_t K) { return torch_inner_sum_sq(x, K, 8); }
static __attribute__((noinline)) float sum_sq_w16(const float *x, int64_t K) { return torch_inner_sum_sq(x, K, 16); }

/* x.pow(2).sum(-1) of one contiguous fp32 row as torch computes it: vectorized_inner_sum when
 * K >= lanes, else scalar_inner_sum (row_sum of single floats) */
static float torch_sum_sq(const float *x, int64_t K) {
    const int W = sum_lanes;
    if (K >= W && W > 1) {
        if (W == 8) return sum_sq_w8(x, K);
        if (W == 16) return sum_sq_w16(x, K);
        return sum_sq_w4(x, K);
    }
    float lanes[16];
    torch_row_sum_sq(x, 1, K, lanes);
    return lanes[0];
}

#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 half to even */

/* The prologue in portable C: amax |(x * r) * nw| (NaN flagged), then the int8 codes of one slice. */
static void amax_scalar(const float *x, const float *nw, int64_t K, float r, float *amax_out, int *nan_out) {
    float amax = 0.0f;
    int nan = 0;
    for (int64_t k = 0; k < K; k++) {
        const float v = fabsf((x[k] * r) * nw[k]);
        amax = v > amax ? v : amax;
        nan |= v != v;
    }
    *amax_out = amax;
    *nan_out = nan;
}

static int32_t quant_scalar(const float *xs, const float *ws, int64_t len, float r, float s_x, int8_t *d) {
    int32_t sum = 0;
    for (int64_t j = 0; j < len; j++) {
        float q = ((xs[j] * r) * ws[j]) * s_x; /* |q| <= 127 * (1 + 2^-23): the magic rounding is exact */
        q = (q + ROUND_MAGIC) - ROUND_MAGIC;
        q = q < -128.0f ? -128.0f : q;
        q = q > 127.0f ? 127.0f : q;
        const int32_t qi = (int32_t)q;
        d[j] = (int8_t)qi;
        sum += qi;
    }
    return sum;
}

#if MMF_X86
/* The same operations 8 lanes at a time (AVX2 without FMA: every product rounds as torch's does). */
static TGT_AVX2 float sum_sq8_avx2(const float *x, int64_t K) {
    const int64_t nvec = K / 8, size = nvec / 4;
    __m256 acc[4][4];
    for (int lv = 0; lv < 4; lv++)
        for (int k = 0; k < 4; k++) acc[lv][k] = _mm256_setzero_ps();
    int64_t lp = ceil_log2(size) / 4;
    if (lp < 4) lp = 4;
    const int64_t step = (int64_t)1 << lp, mask = step - 1;
    int64_t i = 0;
#define ADD_GROUP8(gi)                                                          \
    for (int k = 0; k < 4; k++) {                                               \
        const __m256 v = _mm256_loadu_ps(x + ((gi) * 4 + k) * 8);              \
        acc[0][k] = _mm256_add_ps(acc[0][k], _mm256_mul_ps(v, v));              \
    }
    for (; i + step <= size;) {
        for (int64_t j = 0; j < step; ++j, ++i) { ADD_GROUP8(i) }
        for (int lv = 1; lv < 4; ++lv) {
            for (int k = 0; k < 4; k++) {
                acc[lv][k] = _mm256_add_ps(acc[lv][k], acc[lv - 1][k]);
                acc[lv - 1][k] = _mm256_setzero_ps();
            }
            if ((i & (mask << (lv * lp))) != 0) break;
        }
    }
    for (; i < size; ++i) { ADD_GROUP8(i) }
#undef ADD_GROUP8
    for (int lv = 1; lv < 4; ++lv)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[lv][k]);
    for (int64_t v = size * 4; v < nvec; ++v) {
        const __m256 e = _mm256_loadu_ps(x + v * 8);
        acc[0][0] = _mm256_add_ps(acc[0][0], _mm256_mul_ps(e, e));
    }
    for (int k = 1; k < 4; k++) acc[0][0] = _mm256_add_ps(acc[0][0], acc[0][k]);
    float lanes[8], a = 0.0f;
    _mm256_storeu_ps(lanes, acc[0][0]);
    for (int64_t k = nvec * 8; k < K; k++) a += x[k] * x[k];
    for (int l = 0; l < 8; l++) a += lanes[l];
    return a;
}

static TGT_AVX2 void amax_avx2(const float *x, const float *nw, int64_t K, float r, float *amax_out, int *nan_out) {
    const __m256 rv = _mm256_set1_ps(r), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps(), un = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_and_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), rv), _mm256_loadu_ps(nw + k)),
                                       absmask);
        un = _mm256_or_ps(un, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_max_ps(m, v);
    }
    float lanes[8], amax;
    int nan;
    amax_scalar(x + k, nw + k, K - k, r, &amax, &nan);
    _mm256_storeu_ps(lanes, m);
    for (int l = 0; l < 8; l++) amax = lanes[l] > amax ? lanes[l] : amax;
    *amax_out = amax;
    *nan_out = nan | (_mm256_movemask_ps(un) != 0);
}

static TGT_AVX2 int32_t quant_avx2(const float *xs, const float *ws, int64_t len, float r, float s_x, int8_t *d) {
    const __m256 rv = _mm256_set1_ps(r), sv = _mm256_set1_ps(s_x);
    const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    __m256i sum = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        __m256 q = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xs + j), rv), _mm256_loadu_ps(ws + j)), sv);
        q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* half to even */
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        const __m256i qi = _mm256_cvtps_epi32(q); /* integral values: exact */
        sum = _mm256_add_epi32(sum, qi);
        const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
        _mm_storel_epi64((__m128i *)(d + j), _mm_packs_epi16(p16, p16));
    }
    int32_t lanes[8], total = quant_scalar(xs + j, ws + j, len - j, r, s_x, d + j);
    _mm256_storeu_si256((__m256i *)lanes, sum);
    for (int l = 0; l < 8; l++) total += lanes[l];
    return total;
}
#endif

/* rsqrt(mean(x^2) + eps) of one fp32 row, in torch's order: its sum (ATen's lanes; `vec`: the AVX2 code,
 * same result), / K, + eps, then 1 / sqrt (torch.rsqrt: both correctly rounded) */
static float inv_rms(const float *x, int64_t K, float eps, int vec) {
    float ss;
#if MMF_X86
    if (vec && sum_lanes == 8 && K >= 8) ss = sum_sq8_avx2(x, K);
    else
#endif
        ss = torch_sum_sq(x, K);
    (void)vec;
    return 1.0f / sqrtf(ss / (float)K + eps);
}

/* Quantise one token into 4 slices of Pp int8 (s * Pp + j holds x[s * P + j]); returns sum xq,
 * stores s_x. A token whose normed values are not finite gets xq = 0 and s_x = NaN (the reference
 * gives NaN outputs for it). `vec`: use the AVX2 code (same results, faster). */
static int32_t quantize_token(const float *x, int64_t K, const float *nw, float eps, int64_t P, int64_t Pp,
                              int8_t *dst, float *s_x_out, int vec) {
#if !MMF_X86
    vec = 0;
#endif
    float amax;
    int nan;
    const float r = inv_rms(x, K, eps, vec);
#if MMF_X86
    if (vec) amax_avx2(x, nw, K, r, &amax, &nan);
    else
#endif
        amax_scalar(x, nw, K, r, &amax, &nan);
    memset(dst, 0, (size_t)(4 * Pp));
    if (nan || !isfinite(amax)) {
        *s_x_out = NAN;
        return 0;
    }
    const float s_x = (1.0f / (amax < 1e-5f ? 1e-5f : amax)) * 127.0f; /* torch's 127 / t: reciprocal * 127 */
    int32_t sum = 0;
    for (int s = 0; s < 4; s++) {
        const int64_t k0 = s * P, len = min64(P, K - k0);
        if (len <= 0) break;
#if MMF_X86
        if (vec) sum += quant_avx2(x + k0, nw + k0, len, r, s_x, dst + s * Pp);
        else
#endif
            sum += quant_scalar(x + k0, nw + k0, len, r, s_x, dst + s * Pp);
    }
    *s_x_out = s_x;
    return sum;
}

/* int8 activations (M, K) -> slices (for the integer entry point) */
static int32_t slice_token(const int8_t *xq, int64_t K, int64_t P, int64_t Pp, int8_t *dst) {
    memset(dst, 0, (size_t)(4 * Pp));
    int32_t sum = 0;
    for (int s = 0; s < 4; s++) {
        const int64_t k0 = s * P, len = min64(P, K - k0);
        for (int64_t j = 0; j < len; j++) {
            dst[s * Pp + j] = xq[k0 + j];
            sum += xq[k0 + j];
        }
    }
    return sum;
}

/* ------------------------------------------------------------------------------------------------
 * The product
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    /* inputs of the prologue */
    const float *x;
    const float *nw;
    const int8_t *xq_in;
    float eps;
    int64_t K;
    /* weights */
    const uint8_t *w;
    int64_t N, P, Pp;
    /* quantised activations: M tokens, token t at xs + t * xstride */
    int8_t *xs;
    int64_t M, xstride;
    int32_t *xsum;
    float *denom; /* s_x * s_w per token (NaN: the token's output is NaN) */
    float s_w;
    /* outputs */
    const float *bias;
    float *y;
    int32_t *acc_out;
    /* schedule */
    int isa, R, T;
    int64_t nblock, chunk_rows;
} gemm_job;

static void prologue_chunk(void *ctx, int64_t m) { /* one token */
    gemm_job *jb = (gemm_job *)ctx;
    {
        int8_t *dst = jb->xs + m * jb->xstride;
        if (jb->xq_in) {
            jb->xsum[m] = slice_token(jb->xq_in + m * jb->K, jb->K, jb->P, jb->Pp, dst);
        } else {
            float s_x;
            jb->xsum[m] = quantize_token(jb->x + m * jb->K, jb->K, jb->nw, jb->eps, jb->P, jb->Pp, dst, &s_x,
                                         jb->isa != ISA_SCALAR);
            jb->denom[m] = s_x * jb->s_w;
        }
    }
}

static void gemm_rows(const gemm_job *jb, int64_t n0, int64_t n1) {
    const mk_fn(*tab)[TMAX] = mk_table(jb->isa);
    int32_t acc[RMAX * TMAX];
    const int64_t N = jb->N, P = jb->P;
    for (int64_t nb = n0; nb < n1; nb += jb->nblock) {
        const int64_t ne = min64(n1, nb + jb->nblock);
        for (int64_t t0 = 0; t0 < jb->M; t0 += jb->T) {
            const int tt = (int)min64(jb->T, jb->M - t0);
            for (int64_t n = nb; n < ne; n += jb->R) {
                const int rr = (int)min64(jb->R, ne - n);
                const int8_t *xt = jb->xs + t0 * jb->xstride;
                if (rr == jb->R) {
                    tab[rr - 1][tt - 1](jb->w + n * P, P, xt, jb->xstride, P, jb->Pp, acc);
                } else { /* the last rows of a block: one at a time */
                    int32_t one[RMAX * TMAX];
                    for (int r = 0; r < rr; r++) {
                        tab[0][tt - 1](jb->w + (n + r) * P, P, xt, jb->xstride, P, jb->Pp, one);
                        for (int t = 0; t < tt; t++) acc[r * TMAX + t] = one[t];
                    }
                }
                for (int t = 0; t < tt; t++) {
                    const int64_t m = t0 + t;
                    for (int r = 0; r < rr; r++) {
                        const int32_t v = acc[r * TMAX + t] - jb->xsum[m];
                        if (jb->acc_out) {
                            jb->acc_out[m * N + n + r] = v;
                        } else {
                            float yv = (float)v / jb->denom[m];
                            if (jb->bias) yv = yv + jb->bias[n + r];
                            jb->y[m * N + n + r] = yv;
                        }
                    }
                }
            }
        }
    }
}

static void gemm_chunk(void *ctx, int64_t c) { /* rows [c * chunk_rows, ...) */
    const gemm_job *jb = (const gemm_job *)ctx;
    const int64_t n0 = c * jb->chunk_rows;
    gemm_rows(jb, n0, min64(jb->N, n0 + jb->chunk_rows));
}

/* Work per chunk (and per thread at least): below ~64 KB of weights a thread's wake-up costs more
 * than it saves; tests lower it to run tiny shapes on several threads. */
static int64_t min_parallel_bytes = 64 * 1024;

MMF_EXPORT void mmf_cpu_set_min_parallel_bytes(int64_t n) { min_parallel_bytes = n > 1 ? n : 1; }

static int threads_for(int64_t work_bytes, int nthreads) {
    const int64_t useful = work_bytes / min_parallel_bytes;
    return useful < 1 ? 1 : (useful < nthreads ? (int)useful : nthreads);
}

static int run_gemm(gemm_job *jb, int nthreads) {
    if (jb->isa < 0 || jb->isa >= ISA_COUNT || !mmf_cpu_isa_supported(jb->isa)) return MMF_EISA;
    jb->Pp = round_up(jb->P, 64);
    jb->xstride = 4 * jb->Pp;
    tile_shape(jb->isa, jb->M, &jb->R, &jb->T);
    /* Chunks: one token group streams ~32 KB of weights per chunk (many chunks balance threads);
     * several token groups take ~256 KB blocks (kept in L2 while every group passes over them). */
    const int64_t P = jb->P > 0 ? jb->P : 1;
    const int64_t chunk_bytes = min64(jb->M <= jb->T ? 32 * 1024 : 256 * 1024, min_parallel_bytes);
    jb->chunk_rows = round_up((chunk_bytes + P - 1) / P, RMAX);
    jb->nblock = jb->chunk_rows;
    const size_t need = (size_t)(jb->M * jb->xstride) + (size_t)round_up(jb->M * 8, 64);
    char *buf = (char *)scratch_get(need);
    if (!buf) return MMF_ENOMEM;
    jb->xs = (int8_t *)buf;
    jb->xsum = (int32_t *)(buf + jb->M * jb->xstride);
    jb->denom = (float *)(jb->xsum + jb->M);
    const int nth = threads_for(jb->N * jb->P * (1 + (jb->M - 1) / TMAX), nthreads);
    pool_run(prologue_chunk, jb, jb->M, jb->M == 1 ? 1 : nth);
    pool_run(gemm_chunk, jb, (jb->N + jb->chunk_rows - 1) / jb->chunk_rows, nth);
    return MMF_OK;
}

static int check_dims(int64_t M, int64_t K, int64_t N, int64_t P) {
    if (M < 0 || K <= 0 || N < 0 || P != (K + 3) / 4) return 0;
    if (K > ((int64_t)1 << 24)) return 0; /* int32 accumulators: |acc| <= 2 * 128 * K */
    return 1;
}

static int bitlinear_rows(const float *x, int64_t M, int64_t K, const float *nw, float eps, const uint8_t *w,
                          int64_t N, float s_w, const float *bias, float *y, int nthreads, int isa) {
    gemm_job jb;
    memset(&jb, 0, sizeof(jb));
    jb.x = x;
    jb.nw = nw;
    jb.eps = eps;
    jb.K = K;
    jb.w = w;
    jb.N = N;
    jb.P = (K + 3) / 4;
    jb.M = M;
    jb.s_w = s_w;
    jb.bias = bias;
    jb.y = y;
    jb.isa = isa;
    return run_gemm(&jb, nthreads);
}

/* y (M, N) fp32 = bitlinear_i2(x (M, K) fp32, norm_w (K), packed (N, P) u8, s_w, bias (N) or NULL) */
MMF_EXPORT int mmf_i2_bitlinear(const float *x, int64_t M, int64_t K, const float *norm_w, float eps,
                                const uint8_t *packed, int64_t N, int64_t P, float s_w, const float *bias,
                                float *y, int nthreads, int isa) {
    if (!check_dims(M, K, N, P) || nthreads < 1) return MMF_EARG;
    if (M == 0 || N == 0) return MMF_OK;
    call_begin();
    const int rc = bitlinear_rows(x, M, K, norm_w, eps, packed, N, s_w, bias, y, nthreads, isa);
    call_end();
    return rc;
}

/* acc (M, N) int32 = xq (M, K) int8 @ unpack(packed)^T: the exact integer product alone */
MMF_EXPORT int mmf_i2_gemm_s8(const int8_t *xq, int64_t M, int64_t K, const uint8_t *packed, int64_t N, int64_t P,
                              int32_t *acc, int nthreads, int isa) {
    if (!check_dims(M, K, N, P) || nthreads < 1) return MMF_EARG;
    if (M == 0 || N == 0) return MMF_OK;
    gemm_job jb;
    memset(&jb, 0, sizeof(jb));
    jb.xq_in = xq;
    jb.K = K;
    jb.w = packed;
    jb.N = N;
    jb.P = P;
    jb.M = M;
    jb.acc_out = acc;
    jb.isa = isa;
    call_begin();
    const int rc = run_gemm(&jb, nthreads);
    call_end();
    return rc;
}

/* xq (M, K) int8 and s_x (M) of the prologue alone, as path `isa` computes them (tests compare them
 * with torch's) */
MMF_EXPORT int mmf_quantize_rows(const float *x, int64_t M, int64_t K, const float *norm_w, float eps, int8_t *xq,
                                 float *s_x, int isa) {
    if (M < 0 || K <= 0) return MMF_EARG;
    if (isa < 0 || isa >= ISA_COUNT || !mmf_cpu_isa_supported(isa)) return MMF_EISA;
    const int64_t P = (K + 3) / 4, Pp = round_up(P, 64);
    int8_t *buf = (int8_t *)malloc((size_t)(4 * Pp));
    if (!buf) return MMF_ENOMEM;
    for (int64_t m = 0; m < M; m++) {
        quantize_token(x + m * K, K, norm_w, eps, P, Pp, buf, s_x + m, isa != ISA_SCALAR);
        for (int s = 0; s < 4; s++)
            for (int64_t j = 0; j < P && s * P + j < K; j++) xq[m * K + s * P + j] = buf[s * Pp + j];
    }
    free(buf);
    return MMF_OK;
}

/* ------------------------------------------------------------------------------------------------
 * A whole decode step of the MatMul-free model (HGRNBit) in one call: the embedding rows, every
 * layer (RMSNorm, the i/f/g BitLinears, the MLGRU step with its lower bound, the gated RMSNorm, o,
 * the residual, RMSNorm, gate|up, silu(gate) * up, down, the residual), the final RMSNorm and the
 * LM head, for B tokens, all in fp32. The BitLinears are mmf_i2_bitlinear's (same prologue, same
 * integer product, same epilogue); the elementwise work repeats the torch reference's operations in
 * its order (kernels/reference.py: rms_norm, mlgru_gates, mlgru_scan, gated_rms_norm, the GLU), with
 * libm's expf where torch uses its vectorised exp (both within an ulp), so logits equal the eager
 * model's to a median relative error far below 1e-6 (tests/test_cpu_decode.py).
 * ---------------------------------------------------------------------------------------------- */

/* per-layer pointers, in this order (HGRN_PTRS of them): attn_norm, g_norm, mlp_norm, lower bound
 * (NULL: none), then for the six BitLinears i, f, g, o, gate|up, down: packed weights, norm weight */
#define HGRN_PTRS 16
/* per-layer floats (HGRN_FLOATS): eps_attn, eps_g, eps_mlp, then s_w of the six BitLinears */
#define HGRN_FLOATS 9

/* kernels.reference.rms_norm on one fp32 row: (x * rsqrt(mean(x^2) + eps)) * w */
static void rms_norm_row(const float *x, int64_t K, const float *w, float eps, float *out, int vec) {
    const float r = inv_rms(x, K, eps, vec);
    for (int64_t k = 0; k < K; k++) out[k] = (x[k] * r) * w[k];
}

static inline float silu_f(float v) { return v / (1.0f + expf(-v)); }

MMF_EXPORT int mmf_hgrn_step(int64_t L, int64_t B, int64_t d, int64_t m, int64_t V, const void *const *lp,
                             const float *lf, float bl_eps, const void *emb, int emb_bf16, const int64_t *ids,
                             float *const *state_in, float *state_out, const float *final_norm, float eps_final,
                             const uint8_t *head_w, const float *head_nw, float head_sw, float *logits, float *work,
                             int nthreads, int isa) {
    if (L < 1 || B < 1 || d < 1 || m < 1 || V < 1 || nthreads < 1 || d > ((int64_t)1 << 24) || m > ((int64_t)1 << 24)) return MMF_EARG;
    if (isa < 0 || isa >= ISA_COUNT || !mmf_cpu_isa_supported(isa)) return MMF_EISA;
    const int vec = isa != ISA_SCALAR;
    float *x = work, *h = x + B * d, *gi = h + B * d, *gf = gi + B * d, *gg = gf + B * d, *a = gg + B * d;
    float *u = a + B * d, *v = u + B * 2 * m; /* work holds B * (6 d + 3 m) floats */
    for (int64_t b = 0; b < B; b++) {
        if (ids[b] < 0 || ids[b] >= V) return MMF_EARG;
        if (emb_bf16) {
            const uint16_t *row = (const uint16_t *)emb + ids[b] * d;
            for (int64_t k = 0; k < d; k++) {
                const uint32_t bits = (uint32_t)row[k] << 16;
                memcpy(&x[b * d + k], &bits, 4);
            }
        } else {
            memcpy(x + b * d, (const float *)emb + ids[b] * d, (size_t)d * sizeof(float));
        }
    }
    int rc = MMF_OK;
    call_begin();
    for (int64_t l = 0; l < L && rc == MMF_OK; l++) {
        const void *const *P = lp + l * HGRN_PTRS;
        const float *F = lf + l * HGRN_FLOATS;
        const float *attn_norm = (const float *)P[0], *g_norm = (const float *)P[1];
        const float *mlp_norm = (const float *)P[2], *lb = (const float *)P[3];
#define W(i) ((const uint8_t *)P[4 + 2 * (i)])
#define NW(i) ((const float *)P[5 + 2 * (i)])
        for (int64_t b = 0; b < B; b++) rms_norm_row(x + b * d, d, attn_norm, F[0], h + b * d, vec);
        if ((rc = bitlinear_rows(h, B, d, NW(0), bl_eps, W(0), d, F[3], NULL, gi, nthreads, isa))) break;
        if ((rc = bitlinear_rows(h, B, d, NW(1), bl_eps, W(1), d, F[4], NULL, gf, nthreads, isa))) break;
        if ((rc = bitlinear_rows(h, B, d, NW(2), bl_eps, W(2), d, F[5], NULL, gg, nthreads, isa))) break;
        for (int64_t b = 0; b < B; b++) {
            const float *s0 = state_in[l] ? state_in[l] + b * d : NULL;
            float *s1 = state_out + (l * B + b) * d, *gv = gg + b * d;
            for (int64_t k = 0; k < d; k++) { /* mlgru_gates, then one step of mlgru_scan */
                float f = 1.0f / (1.0f + expf(-gf[b * d + k]));
                if (lb) f = lb[k] + (1.0f - lb[k]) * f;
                const float i = silu_f(gi[b * d + k]) * (1.0f - f);
                s1[k] = s0 ? f * s0[k] + i : f * 0.0f + i;
            }
            rms_norm_row(gv, d, g_norm, F[1], h + b * d, vec); /* gated_rms_norm: rmsnorm(g) * w * silu(s) */
            for (int64_t k = 0; k < d; k++) h[b * d + k] = h[b * d + k] * silu_f(s1[k]);
        }
        if ((rc = bitlinear_rows(h, B, d, NW(3), bl_eps, W(3), d, F[6], NULL, a, nthreads, isa))) break;
        for (int64_t k = 0; k < B * d; k++) x[k] = x[k] + a[k];
        for (int64_t b = 0; b < B; b++) rms_norm_row(x + b * d, d, mlp_norm, F[2], h + b * d, vec);
        if ((rc = bitlinear_rows(h, B, d, NW(4), bl_eps, W(4), 2 * m, F[7], NULL, u, nthreads, isa))) break;
        for (int64_t b = 0; b < B; b++)
            for (int64_t k = 0; k < m; k++) v[b * m + k] = silu_f(u[b * 2 * m + k]) * u[b * 2 * m + m + k];
        if ((rc = bitlinear_rows(v, B, m, NW(5), bl_eps, W(5), d, F[8], NULL, a, nthreads, isa))) break;
        for (int64_t k = 0; k < B * d; k++) x[k] = x[k] + a[k];
#undef W
#undef NW
    }
    if (rc == MMF_OK) {
        for (int64_t b = 0; b < B; b++) rms_norm_row(x + b * d, d, final_norm, eps_final, h + b * d, vec);
        rc = bitlinear_rows(h, B, d, head_nw, bl_eps, head_w, V, head_sw, NULL, logits, nthreads, isa);
    }
    call_end();
    return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Validity of packed bytes: digits equal to 0b11, and padding digits that are not code 1
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    int64_t N, P, K, chunk_rows;
    _Atomic int64_t bad;
} check_job;

static void check_chunk(void *ctx, int64_t c) {
    check_job *cj = (check_job *)ctx;
    const int64_t lo = c * cj->chunk_rows, hi = min64(cj->N, lo + cj->chunk_rows);
    int64_t bad = 0;
    const uint8_t *p = cj->p + lo * cj->P;
    const int64_t nbytes = (hi - lo) * cj->P;
    for (int64_t i = 0; i < nbytes; i++) bad += ((p[i] >> 1) & p[i] & 0x55) != 0;
    for (int64_t n = lo; n < hi; n++)
        for (int64_t k = cj->K; k < 4 * cj->P; k++) {
            const unsigned b = cj->p[n * cj->P + k % cj->P];
            bad += ((b >> (2 * (k / cj->P))) & 3) != 1;
        }
    atomic_fetch_add(&cj->bad, bad);
}

/* number of bad bytes or padding digits (0: valid i2 of logical shape (N, K)) */
MMF_EXPORT int64_t mmf_i2_count_invalid(const uint8_t *packed, int64_t N, int64_t P, int64_t K, int nthreads) {
    if (N < 0 || K <= 0 || P != (K + 3) / 4 || nthreads < 1) return MMF_EARG;
    check_job cj;
    memset(&cj, 0, sizeof(cj));
    cj.p = packed;
    cj.N = N;
    cj.P = P;
    cj.K = K;
    cj.chunk_rows = 1 + (1 << 20) / P; /* ~1 MB per chunk */
    call_begin();
    pool_run(check_chunk, &cj, (N + cj.chunk_rows - 1) / cj.chunk_rows, nthreads);
    call_end();
    return atomic_load(&cj.bad);
}

/* ------------------------------------------------------------------------------------------------
 * Read bandwidth: a read-only stream over a buffer (the benchmark's reference for "memory-bound")
 * ---------------------------------------------------------------------------------------------- */

#define STREAM_CHUNK ((int64_t)1 << 20)

typedef struct {
    const uint8_t *p;
    int64_t n;
    int isa;
    _Atomic uint64_t out;
} stream_job;

#if MMF_X86
static TGT_AVX512 uint64_t stream_avx512(const uint8_t *p, int64_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 256 <= n; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_loadu_si512((const void *)(p + i)));
        a1 = _mm512_xor_si512(a1, _mm512_loadu_si512((const void *)(p + i + 64)));
        a2 = _mm512_xor_si512(a2, _mm512_loadu_si512((const void *)(p + i + 128)));
        a3 = _mm512_xor_si512(a3, _mm512_loadu_si512((const void *)(p + i + 192)));
    }
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    uint64_t lanes[8], r = 0;
    _mm512_storeu_si512((void *)lanes, a0);
    for (int l = 0; l < 8; l++) r ^= lanes[l];
    for (; i < n; i++) r ^= p[i];
    return r;
}

static TGT_AVX2 uint64_t stream_avx2(const uint8_t *p, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    uint64_t lanes[4], r = 0;
    _mm256_storeu_si256((__m256i *)lanes, a0);
    for (int l = 0; l < 4; l++) r ^= lanes[l];
    for (; i < n; i++) r ^= p[i];
    return r;
}
#endif

static uint64_t stream_scalar(const uint8_t *p, int64_t n) {
    uint64_t r0 = 0, r1 = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint64_t a, b;
        memcpy(&a, p + i, 8);
        memcpy(&b, p + i + 8, 8);
        r0 ^= a;
        r1 ^= b;
    }
    for (; i < n; i++) r0 ^= p[i];
    return r0 ^ r1;
}

static void stream_chunk(void *ctx, int64_t c) {
    stream_job *sj = (stream_job *)ctx;
    const int64_t lo = c * STREAM_CHUNK, hi = min64(sj->n, lo + STREAM_CHUNK);
    uint64_t r = 0;
    if (lo < hi) {
#if MMF_X86
        if (sj->isa == ISA_AVX512VNNI) r = stream_avx512(sj->p + lo, hi - lo);
        else if (sj->isa != ISA_SCALAR) r = stream_avx2(sj->p + lo, hi - lo);
        else
#endif
            r = stream_scalar(sj->p + lo, hi - lo);
    }
    atomic_fetch_xor(&sj->out, r);
}

/* xor of all 8-byte words of buf (a checksum nobody needs: it keeps the loads alive) */
MMF_EXPORT uint64_t mmf_read_stream(const uint8_t *buf, int64_t n, int nthreads, int isa) {
    if (n < 0 || nthreads < 1 || isa < 0 || isa >= ISA_COUNT || !mmf_cpu_isa_supported(isa)) return 0;
    stream_job sj;
    memset(&sj, 0, sizeof(sj));
    sj.p = buf;
    sj.n = n;
    sj.isa = isa;
    call_begin();
    pool_run(stream_chunk, &sj, (n + STREAM_CHUNK - 1) / STREAM_CHUNK, nthreads);
    call_end();
    return atomic_load(&sj.out);
}
