/* Hot loops of the TopK family's step that torch has no single fast op for (see sae/native.py).
 *
 * GNU C11 (for its vector extensions) + OpenMP. Built on first use by sae/native.py with the machine's C
 * compiler and loaded with ctypes; OpenMP resolves to the libgomp torch has already loaded, so these loops
 * run on torch's own thread pool. Every function is exact (it returns entries of its input, or sums in fp32), row-parallel,
 * and never allocates more than a few rows of scratch per thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Rearrange vals/ids [0, n) so that the first k hold the k largest values (any order): quickselect with a
 * three-way partition, so runs of equal values cost one pass (an all-equal row is linear, not quadratic). */
static void select_largest(float *vals, int64_t *ids, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n;
    while (hi - lo > 1 && k > lo && k < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        float a = vals[lo], b = vals[mid], c = vals[hi - 1];
        float pivot = (a < b) ? ((b < c) ? b : ((a < c) ? c : a)) : ((a < c) ? a : ((b < c) ? c : b));
        int64_t lt = lo, i = lo, gt = hi;       /* [lo,lt) > pivot, [lt,i) == pivot, [gt,hi) < pivot */
        while (i < gt) {
            float v = vals[i];
            if (v > pivot) {
                float tv = vals[lt]; vals[lt] = v; vals[i] = tv;
                if (ids) { int64_t ti = ids[lt]; ids[lt] = ids[i]; ids[i] = ti; }
                lt++; i++;
            } else if (v < pivot) {
                gt--;
                float tv = vals[gt]; vals[gt] = v; vals[i] = tv;
                if (ids) { int64_t ti = ids[gt]; ids[gt] = ids[i]; ids[i] = ti; }
            } else {
                i++;
            }
        }
        if (k <= lt) hi = lt;            /* the k largest lie in the "greater" part */
        else if (k <= gt) return;        /* the first k are greater than or equal to the pivot: done */
        else lo = gt;                    /* all of [lo, gt) belong; look further down */
    }
}

/* Copy the entries of row [width] that are >= bound (> bound when strict) into vals [width + 16] and their
 * columns into cols [width + 16], in column order; returns how many. (The AVX-512 path compresses in
 * registers and stores whole vectors: a compressing store to memory is microcoded and slow on Zen 4/5.) */
static int64_t collect(const float *row, int64_t width, float bound, int strict, float *vals, int32_t *cols) {
    int64_t count = 0, j = 0;
#ifdef __AVX512F__
    const __m512 limit = _mm512_set1_ps(bound);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= width; j += 16) {
        __m512 v = _mm512_loadu_ps(row + j);
        __mmask16 hit = strict ? _mm512_cmp_ps_mask(v, limit, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, limit, _CMP_GE_OQ);
        if (!hit) continue;
        _mm512_storeu_ps(vals + count, _mm512_maskz_compress_ps(hit, v));
        __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32((int32_t)j));
        _mm512_storeu_si512((void *)(cols + count), _mm512_maskz_compress_epi32(hit, at));
        count += __builtin_popcount((unsigned)hit);
    }
#endif
    for (; j < width; j++) {
        vals[count] = row[j];
        cols[count] = (int32_t)j;
        count += strict ? row[j] > bound : row[j] >= bound;
    }
    return count;
}

/* The k-th largest of vals [n] (1 <= k <= n, no NaN). vals must have room for n rounded up to 16: the
 * AVX-512 path pads it with -inf there. Each entry's rank (how many entries exceed it) is a vector count;
 * the k-th largest is the smallest entry of rank < k. O(n^2 / 16) compares, branch-free: faster than a
 * quickselect's mispredicted branches for the few hundred entries this sees. */
static float kth_largest(float *vals, int64_t n, int64_t k, float *scratch) {
#ifdef __AVX512F__
    if (n <= 1024) {
        int64_t padded = (n + 15) & ~(int64_t)15;
        for (int64_t i = n; i < padded; i++) vals[i] = -__builtin_inff();
        float best = __builtin_inff();
        for (int64_t j = 0; j < n; j++) {
            __m512 probe = _mm512_set1_ps(vals[j]);
            int64_t above = 0;
            for (int64_t i = 0; i < padded; i += 16)
                above += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(_mm512_loadu_ps(vals + i), probe, _CMP_GT_OQ));
            if (above < k && vals[j] < best) best = vals[j];
        }
        return best;
    }
#endif
    memcpy(scratch, vals, sizeof(float) * n);
    select_largest(scratch, NULL, n, k);
    float bound = scratch[0];
    for (int64_t j = 1; j < k; j++) bound = scratch[j] < bound ? scratch[j] : bound;
    return bound;
}

/* Per-row exact top-k of pre [n, width] (row-major) into values/indices [n, k] (unsorted).
 *
 * The row is cut into `blocks` strided blocks (block j: columns j, j + blocks, ...; blocks divides width).
 * t, the k-th largest block maximum, is a lower bound for the row's k-th largest value (k blocks each hold
 * an entry >= t), so every top-k entry is >= t and lies in a block whose maximum is >= t. Only those
 * blocks are scanned for candidates. The strided maxima are an elementwise max of contiguous rows of
 * `blocks` floats, which the compiler vectorises.
 * A row holding a NaN is not done: failed[r] = 1 (the caller redoes such rows with torch.topk, which
 * orders NaN first). Returns the number of failed rows. */
int64_t sae_topk_rows(const float *pre, int64_t n, int64_t width, int64_t k, int64_t blocks,
                      float *values, int64_t *indices, uint8_t *failed) {
    int64_t n_failed = 0;
    const int64_t depth = width / blocks;
#pragma omp parallel reduction(+ : n_failed) if (n >= 16)
    {
        float *maxima = malloc(sizeof(float) * (blocks + 16));
        float *scratch = malloc(sizeof(float) * (width + 16));
        float *cand_vals = malloc(sizeof(float) * (width + 16));
        int32_t *cand_cols = malloc(sizeof(int32_t) * (width + 16));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const float *row = pre + r * width;
            int nan_seen = 0;
            memcpy(maxima, row, sizeof(float) * blocks);
            for (int64_t j = 0; j < blocks; j++) nan_seen |= (row[j] != row[j]);
            for (int64_t i = 1; i < depth; i++) {
                const float *part = row + i * blocks;
                for (int64_t j = 0; j < blocks; j++) {
                    float v = part[j];
                    nan_seen |= (v != v);
                    maxima[j] = v > maxima[j] ? v : maxima[j];
                }
            }
            failed[r] = (uint8_t)nan_seen;
            if (nan_seen) { n_failed++; continue; }
            float bound = kth_largest(maxima, blocks, k, scratch);
            int64_t count = collect(row, width, bound, 0, cand_vals, cand_cols);
            float kth = kth_largest(cand_vals, count, k, scratch);
            int64_t taken = 0;                                   /* those above the k-th, then ties */
            float *out_vals = values + r * k;
            int64_t *out_ids = indices + r * k;
            for (int64_t c = 0; c < count; c++)
                if (cand_vals[c] > kth) { out_vals[taken] = cand_vals[c]; out_ids[taken++] = cand_cols[c]; }
            for (int64_t c = 0; c < count && taken < k; c++)
                if (cand_vals[c] == kth) { out_vals[taken] = cand_vals[c]; out_ids[taken++] = cand_cols[c]; }
        }
        free(maxima); free(scratch); free(cand_vals); free(cand_cols);
    }
    return n_failed;
}

/* rows [n, d] (row-major): each row divided by max(its L2 norm, eps), in place. */
void sae_normalize_rows(float *rows, int64_t n, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (n * d >= 65536)
    for (int64_t r = 0; r < n; r++) {
        float *row = rows + r * d;
        float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < d; i++) sq += row[i] * row[i];
        float norm = __builtin_sqrtf(sq);
        norm = norm > eps ? norm : eps;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) row[i] = row[i] / norm;
    }
}

/* out [d] = scale * sum_r weights[r] * rows[r] for rows [n, d] (row-major): each thread sums its share of
 * the rows into its own d floats, then the threads' partial sums are added in thread order. */
void sae_weighted_row_sum(const float *rows, const float *weights, int64_t n, int64_t d, float scale,
                          float *out) {
    int threads = 1;
#ifdef _OPENMP
    threads = n * d >= 65536 ? omp_get_max_threads() : 1;
#endif
    float *partial = calloc((size_t)threads * d, sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        float *acc = partial + (int64_t)t * d;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const float *row = rows + r * d;
            const float w = weights[r];
#pragma omp simd
            for (int64_t i = 0; i < d; i++) acc[i] += w * row[i];
        }
    }
    for (int64_t i = 0; i < d; i++) {
        float total = 0.0f;
        for (int t = 0; t < threads; t++) total += partial[(int64_t)t * d + i];
        out[i] = scale * total;
    }
    free(partial);
}

/* Sixteen floats as one value: GCC/Clang lower it to the widest vector the target has (AVX-512: one
 * register; AVX2/NEON: two or four). The unaligned variant reads and writes rows at any float offset. */
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16u __attribute__((vector_size(64), aligned(4)));

/* Latent-major bags of n entries: starts [n_latents + 1], the first position in `order` of each latent
 * (order lists the entries sorted by latent id ids[e]); sources [n], the row of `dense` [*, d] each position
 * reads (rows[e], or e / per_row when rows is NULL: one division per entry, not one per column block); and
 * scales [n], the entry's weight. */
struct bags { int64_t *starts; const float **sources; float *scales; };

static struct bags latent_bags(const float *dense, int64_t d, const int64_t *ids, const int64_t *order,
                               const float *weights, const int64_t *rows, int64_t per_row, int64_t n,
                               int64_t n_latents) {
    struct bags bags = {malloc(sizeof(int64_t) * (n_latents + 1)), malloc(sizeof(float *) * (n > 0 ? n : 1)),
                        malloc(sizeof(float) * (n > 0 ? n : 1))};
    int64_t pos = 0;
    for (int64_t l = 0; l < n_latents; l++) {
        bags.starts[l] = pos;
        while (pos < n && ids[order[pos]] == l) pos++;
    }
    bags.starts[n_latents] = pos;
#pragma omp parallel for schedule(static) if (n >= 16384)
    for (int64_t p = 0; p < n; p++) {
        const int64_t e = order[p];
        bags.sources[p] = dense + (rows ? rows[e] : e / per_row) * d;
        bags.scales[p] = weights[e];
    }
    return bags;
}

static void free_bags(struct bags bags) {
    free(bags.starts); free(bags.sources); free(bags.scales);
}

/* target [d] = sum over positions p in [first, end) of scales[p] * sources[p] - c * minus (minus may be
 * NULL), 64 columns at a time with the sums in registers. */
static void weighted_sum(const float *const *sources, const float *scales, int64_t first, int64_t end,
                         int64_t d, float c, const float *minus, float *target) {
    int64_t c0 = 0;
    for (; c0 + 64 <= d; c0 += 64) {
        vec16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t p = first; p < end; p++) {
            const vec16u *src = (const vec16u *)(sources[p] + c0);
            const float w = scales[p];
            a0 += w * src[0]; a1 += w * src[1]; a2 += w * src[2]; a3 += w * src[3];
        }
        if (minus) {
            const vec16u *u = (const vec16u *)(minus + c0);
            a0 -= c * u[0]; a1 -= c * u[1]; a2 -= c * u[2]; a3 -= c * u[3];
        }
        vec16u *dst = (vec16u *)(target + c0);
        dst[0] = a0; dst[1] = a1; dst[2] = a2; dst[3] = a3;
    }
    for (int64_t i = c0; i < d; i++) {          /* the last d % 64 columns */
        float sum = 0.0f;
        for (int64_t p = first; p < end; p++) sum += scales[p] * sources[p][i];
        target[i] = minus ? sum - c * minus[i] : sum;
    }
}

/* out [n_latents, d] = S^T dense, S [batch, n_latents] sparse with weights[e] at (row(e), ids[e]) for
 * e in [0, n): row l of out sums weights[e] * dense[row(e)] over the entries of latent l, in the order
 * `order` lists them (entries sorted by latent, as latent_order makes it). row(e) = rows[e], or e / per_row
 * when rows is NULL. Parallel over latents: each output row is written once, by one thread. */
void sae_latent_major(const float *dense, int64_t d, const int64_t *ids, const int64_t *order,
                      const float *weights, const int64_t *rows, int64_t per_row, int64_t n, int64_t n_latents,
                      float *out) {
    struct bags bags = latent_bags(dense, d, ids, order, weights, rows, per_row, n, n_latents);
    const int64_t *starts = bags.starts;
    const float *const *sources = bags.sources;
    const float *scales = bags.scales;
#pragma omp parallel for schedule(static) if (n * d >= 65536)
    for (int64_t l = 0; l < n_latents; l++)
        weighted_sum(sources, scales, starts[l], starts[l + 1], d, 0.0f, NULL, out + l * d);
    free_bags(bags);
}

/* The sparse decoder's whole backward in one pass over the latents. Entries e in [0, n) select row ids[e]
 * of W [n_latents, d] with value values[e] for row(e) of grad_out [batch, d] (row(e) = rows[e], or
 * e / per_row); `order` lists the entries sorted by latent. Writes
 *   sampled[e] = grad_out[row(e)] . W[ids[e]]                    (the values' gradient)
 *   grad_W[l]  = sum over l's entries of values[e] * grad_out[row(e)]
 *                - (unit_rows ? sum of values[e] * sampled[e] : 0) * W[l]   (minus the part along W[l])
 * Each W row is read once and each selected grad_out row twice (the second time from L1), where separate
 * dot and gather passes would read both once per entry. */
void sae_decoder_backward(const float *grad_out, const float *W, int64_t d, const int64_t *ids,
                          const int64_t *order, const float *values, const int64_t *rows, int64_t per_row,
                          int64_t n, int64_t n_latents, int unit_rows, float *sampled, float *grad_W) {
    struct bags bags = latent_bags(grad_out, d, ids, order, values, rows, per_row, n, n_latents);
    const int64_t *starts = bags.starts;
    const float *const *sources = bags.sources;
    const float *scales = bags.scales;
#pragma omp parallel for schedule(static) if (n * d >= 65536)
    for (int64_t l = 0; l < n_latents; l++) {
        const float *w_row = W + l * d;
        float along = 0.0f;
        for (int64_t p = starts[l]; p < starts[l + 1]; p++) {
            const float *src = sources[p];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; i++) dot += src[i] * w_row[i];
            sampled[order[p]] = dot;
            along += scales[p] * dot;
        }
        weighted_sum(sources, scales, starts[l], starts[l + 1], d, unit_rows ? along : 0.0f,
                     unit_rows ? w_row : NULL, grad_W + l * d);
    }
    free_bags(bags);
}

/* out [n_bags, d]: out[b] = sum of weights[e] * table[ids[e]] over the entries e of bag b, which are
 * offsets[b] .. offsets[b + 1] - 1 (CSR), or b * per_bag .. (b + 1) * per_bag - 1 when offsets is NULL.
 * A sparse decode: gather-and-sum of the selected decoder rows (weighted_sum). */
void sae_bag_sum(const float *table, int64_t d, const int64_t *ids, const float *weights, const int64_t *offsets,
                 int64_t per_bag, int64_t n_bags, float *out) {
    const int64_t n = offsets ? offsets[n_bags] : n_bags * per_bag;
    const float **sources = malloc(sizeof(float *) * (n > 0 ? n : 1));   /* the table row of each entry */
#pragma omp parallel if (n_bags * d >= 65536)
    {
#pragma omp for schedule(static)
        for (int64_t e = 0; e < n; e++) sources[e] = table + ids[e] * d;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_bags; b++) {
            const int64_t first = offsets ? offsets[b] : b * per_bag;
            weighted_sum(sources, weights, first, offsets ? offsets[b + 1] : first + per_bag, d, 0.0f, NULL,
                         out + b * d);
        }
    }
    free(sources);
}

/* How many entries of each row of pre [n, width] exceed bound: counts [n]. Returns their total. */
int64_t sae_count_above(const float *pre, int64_t n, int64_t width, float bound, int64_t *counts) {
    int64_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (n >= 16)
    for (int64_t r = 0; r < n; r++) {
        const float *row = pre + r * width;
        int64_t count = 0, j = 0;
#ifdef __AVX512F__
        const __m512 limit = _mm512_set1_ps(bound);
        for (; j + 16 <= width; j += 16)
            count += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), limit, _CMP_GT_OQ));
#endif
        for (; j < width; j++) count += row[j] > bound;
        counts[r] = count;
        total += count;
    }
    return total;
}

/* The entries of pre [n, width] above bound, row by row and in column order within a row: row r's go to
 * positions offsets[r] .. offsets[r + 1] - 1 (offsets from sae_count_above's counts) of rows_out, cols_out
 * and values_out. */
void sae_entries_above(const float *pre, int64_t n, int64_t width, float bound, const int64_t *offsets,
                       int64_t *rows_out, int64_t *cols_out, float *values_out) {
#pragma omp parallel if (n >= 16)
    {
        float *vals = malloc(sizeof(float) * (width + 16));
        int32_t *cols = malloc(sizeof(int32_t) * (width + 16));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const int64_t count = collect(pre + r * width, width, bound, 1, vals, cols);
            const int64_t at = offsets[r];
            for (int64_t c = 0; c < count && at + c < offsets[r + 1]; c++) {
                rows_out[at + c] = r;
                cols_out[at + c] = cols[c];
                values_out[at + c] = vals[c];
            }
        }
        free(vals); free(cols);
    }
}

/* One Adam step (torch.optim.Adam's update, no weight decay) over p, g, m, v [rows, cols], in place:
 *   m = m + (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2
 *   p = p - (lr / bias1) m / (sqrt(v) / bias2_sqrt + eps)
 * with bias1 = 1 - beta1^t and bias2_sqrt = sqrt(1 - beta2^t). With unit_rows, each row of p is then
 * divided by max(its norm, norm_eps) while it is still in L1 (a unit-norm decoder's renormalisation, which
 * would otherwise be a second pass over the matrix). */
void sae_adam_step(float *p, const float *g, float *m, float *v, int64_t rows, int64_t cols, float lr,
                   float beta1, float beta2, float eps, float bias1, float bias2_sqrt, int unit_rows,
                   float norm_eps) {
    const float step_size = lr / bias1;
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * cols, *mr = m + r * cols, *vr = v + r * cols;
        const float *gr = g + r * cols;
        float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < cols; i++) {
            const float grad = gr[i];
            const float first = mr[i] + (1.0f - beta1) * (grad - mr[i]);
            const float second = beta2 * vr[i] + (1.0f - beta2) * grad * grad;
            mr[i] = first;
            vr[i] = second;
            const float updated = pr[i] - step_size * first / (__builtin_sqrtf(second) / bias2_sqrt + eps);
            pr[i] = updated;
            sq += updated * updated;
        }
        if (unit_rows) {
            float norm = __builtin_sqrtf(sq);
            norm = norm > norm_eps ? norm : norm_eps;
#pragma omp simd
            for (int64_t i = 0; i < cols; i++) pr[i] = pr[i] / norm;
        }
    }
}
