/* bfloat16 products y = op(x @ Wᵀ + bias) on CPUs with AVX512-BF16, W packed in panels.
 *
 * A panel is 32 of W's output columns laid out along K as pairs: panel[K/2][32][2], the order
 * vdpbf16ps reads. Each thread streams its own run of panels from memory once and multiplies
 * every row of x by a panel while it is in cache, up to ROWS rows at a time in registers.
 * oneDNN's 9-row products read their weights from memory at 17-25 GB/s on a 2-core Zen 4 whose
 * sum of a large tensor reads 32-45; one sequential stream per thread keeps the hardware
 * prefetcher ahead of the arithmetic.
 * Where x's rows are a multiple of 4 KiB apart (K = 2048, 4096), a block's rows all fall on the
 * same L1 set, which holds 8 lines: blocks there have at most ALIASED_ROWS rows, which leaves the
 * panel's lines room (6 and 8 measured alike; 12 rows, or x first copied out into pairs, 4-14 % slower).
 */
#include <immintrin.h>
#include <stdint.h>

typedef uint16_t bf16;

enum { COLS = 32, ROWS = 12, ALIASED_ROWS = 6, CHUNK = 192 };
enum op { OP_NONE, OP_SILU, OP_MUL, OP_ADD };

static inline __m512 widen(const bf16 *p) {  /* 16 bfloat16 -> 16 float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 exp_ps(__m512 x) {  /* e^x to float32 precision: 2^n · e^r, |r| ≤ ln2/2 */
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 silu(__m512 v) {  /* v · σ(v) */
    __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

static inline __m512 finish(__m512 v, int op, const bf16 *bias, const bf16 *other) {
    if (bias) v = _mm512_add_ps(v, widen(bias));
    switch (op) {
    case OP_SILU: return silu(v);
    case OP_MUL: return _mm512_mul_ps(v, widen(other));
    case OP_ADD: return _mm512_add_ps(v, widen(other));
    default: return v;
    }
}

/* R rows of y, the 32 columns of one panel */
static inline __attribute__((always_inline)) void rows_by_panel(
    const int R, const bf16 *x, const bf16 *panel, int64_t k, const bf16 *bias, const bf16 *other,
    bf16 *y, int64_t n, int op) {
    __m512 lo[ROWS], hi[ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k / 2; kk++) {
        __m512bh w_lo = (__m512bh)_mm512_loadu_si512(panel + kk * 2 * COLS);
        __m512bh w_hi = (__m512bh)_mm512_loadu_si512(panel + kk * 2 * COLS + COLS);
#pragma GCC unroll 12
        for (int r = 0; r < R; r++) {
            __m512bh pair = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + r * k + 2 * kk));
            lo[r] = _mm512_dpbf16_ps(lo[r], pair, w_lo);
            hi[r] = _mm512_dpbf16_ps(hi[r], pair, w_hi);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; r++) {
        const bf16 *o = other ? other + r * n : 0;
        __m512 a = finish(lo[r], op, bias, o), b = finish(hi[r], op, bias ? bias + 16 : 0, o ? o + 16 : 0);
        _mm256_storeu_si256((__m256i *)(y + r * n), (__m256i)_mm512_cvtneps_pbh(a));
        _mm256_storeu_si256((__m256i *)(y + r * n + 16), (__m256i)_mm512_cvtneps_pbh(b));
    }
}

#define ROWS_CASE(R) case R: rows_by_panel(R, x, panel, k, bias, other, y, n, op); break;
static void any_rows_by_panel(int rows, const bf16 *x, const bf16 *panel, int64_t k, const bf16 *bias,
                              const bf16 *other, bf16 *y, int64_t n, int op) {
    switch (rows) {
    ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
    ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12)
    }
}

/* y [m, n] = op(x [m, k] @ Wᵀ + bias [n]; other [m, n]); W as n/32 panels; bias, other may be NULL.
 * Rows go CHUNK at a time through every panel: x stays in cache at any batch. */
void panel_linear(const bf16 *x, const bf16 *panels, const bf16 *bias, const bf16 *other, bf16 *y,
                  int64_t m, int64_t n, int64_t k, int op, int threads) {
    int most = k * sizeof(bf16) % 4096 == 0 ? ALIASED_ROWS : ROWS;
#pragma omp parallel num_threads(threads)
    for (int64_t c0 = 0; c0 < m; c0 += CHUNK) {
        int64_t rows = m - c0 < CHUNK ? m - c0 : CHUNK;
        int64_t blocks = (rows + most - 1) / most, per = (rows + blocks - 1) / blocks;  /* even row blocks */
#pragma omp for schedule(static)
        for (int64_t p = 0; p < n / COLS; p++) {
            for (int64_t r0 = c0; r0 < c0 + rows; r0 += per) {
                int r = (int)(c0 + rows - r0 < per ? c0 + rows - r0 : per);
                any_rows_by_panel(r, x + r0 * k, panels + p * k * COLS, k, bias ? bias + p * COLS : 0,
                                  other ? other + r0 * n + p * COLS : 0, y + r0 * n + p * COLS, n, op);
            }
        }
    }
}
