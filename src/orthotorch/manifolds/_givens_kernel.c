/* Givens-rotation kernels on disjoint row pairs, called from orthotorch.manifolds.givens via ctypes.
 *
 * Element (b, r, t) of a batched matrix lives at b*bs + r*rs + t*cs. Two loop orders:
 *   cs == 1  (rows contiguous): one pass per pair (dot products, then rotation while the rows are hot);
 *   rs == 1  (columns contiguous, e.g. the transpose of a wide weight): coefficients pair by pair, rotation
 *            row by row of the underlying storage.
 * Rotation convention: x_i <- c x_i + s x_j, x_j <- -s x_i + c x_j, i.e. expm(theta (E_ij - E_ji)) acting
 * on the left. Every function returns 0, or -1 when an index is out of range (nothing is written then).
 * The fused multi-matching steps ot_steps_* and ot_adam_steps_* live in _givens_steps_impl.c (included
 * below, once per type).
 */
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GRAIN 32768

static inline float cm1_f32(float t) { float h = sinf(0.5f * t); return -2.0f * h * h; }
static inline double cm1_f64(double t) { double h = sin(0.5 * t); return -2.0 * h * h; }

static int check_idx(const int64_t *I, const int64_t *J, int64_t P, int64_t n) {
    for (int64_t p = 0; p < P; p++)
        if (I[p] < 0 || I[p] >= n || J[p] < 0 || J[p] >= n) return -1;
    return 0;
}

#define DEFINE_KERNELS(T, SFX, CM1, SIN)                                                              \
    static inline void coef_pair_##SFX(const T *x, int64_t xrs, int64_t xcs, const T *g, int64_t grs,  \
                                       int64_t gcs, int64_t i, int64_t j, int64_t k, T *out) {         \
        const T *xi = x + i * xrs, *xj = x + j * xrs, *gi = g + i * grs, *gj = g + j * grs;           \
        T a = 0, b = 0;                                                                               \
        if (xcs == 1 && gcs == 1) {                                                                   \
            _Pragma("omp simd reduction(+ : a, b)") for (int64_t t = 0; t < k; t++) {                 \
                a += gi[t] * xj[t];                                                                   \
                b += xi[t] * gj[t];                                                                   \
            }                                                                                         \
        } else {                                                                                      \
            for (int64_t t = 0; t < k; t++) {                                                         \
                a += gi[t * gcs] * xj[t * xcs];                                                       \
                b += xi[t * xcs] * gj[t * gcs];                                                       \
            }                                                                                         \
        }                                                                                             \
        *out = a - b;                                                                                 \
    }                                                                                                 \
    /* Increment form x += (c - 1) x + s y with c - 1 = -2 sin^2(theta/2): for small angles cos(theta) \
     * rounds to 1 and the plain form scales the rows by sqrt(1 + theta^2) every step (float32 drift). */ \
    static inline void rot_pair_##SFX(T *x, int64_t xrs, int64_t i, int64_t j, int64_t k, T cm1, T s) { \
        T *xi = x + i * xrs, *xj = x + j * xrs;                                                       \
        _Pragma("omp simd") for (int64_t t = 0; t < k; t++) {                                         \
            T u = xi[t], v = xj[t];                                                                   \
            xi[t] = u + (cm1 * u + s * v);                                                            \
            xj[t] = v + (cm1 * v - s * u);                                                            \
        }                                                                                             \
    }                                                                                                 \
    int ot_coeffs_##SFX(const T *x, int64_t xbs, int64_t xrs, int64_t xcs, const T *g, int64_t gbs,   \
                        int64_t grs, int64_t gcs, const int64_t *I, const int64_t *J, int64_t B,      \
                        int64_t n, int64_t P, int64_t k, T *w, int nthreads) {                        \
        if (check_idx(I, J, P, n)) return -1;                                                         \
        int64_t total = B * P;                                                                        \
        if (xcs != 1 && xrs == 1 && grs == 1) {                                                       \
            /* columns contiguous: walk storage rows t, accumulating every pair (cache friendly) */   \
            for (int64_t b = 0; b < B; b++) {                                                         \
                const T *xb = x + b * xbs, *gb = g + b * gbs;                                         \
                T *wb = w + b * P;                                                                    \
                for (int64_t p = 0; p < P; p++) wb[p] = 0;                                            \
                int nt = (P * k > GRAIN) ? nthreads : 1;                                              \
                T *acc = (T *)calloc((size_t)(P * nt), sizeof(T));                                    \
                if (!acc) return -2;                                                                  \
                /* fixed chunk per thread, reduced in thread order: deterministic for a thread count */ \
                _Pragma("omp parallel for num_threads(nt) schedule(static, 1)")                       \
                for (int c = 0; c < nt; c++) {                                                        \
                    int64_t t0 = k * c / nt, t1 = k * (c + 1) / nt;                                   \
                    T *a = acc + (int64_t)c * P;                                                      \
                    for (int64_t t = t0; t < t1; t++) {                                               \
                        const T *xr = xb + t * xcs, *gr = gb + t * gcs;                               \
                        for (int64_t p = 0; p < P; p++)                                               \
                            a[p] += gr[I[p]] * xr[J[p]] - xr[I[p]] * gr[J[p]];                        \
                    }                                                                                 \
                }                                                                                     \
                for (int c = 0; c < nt; c++)                                                          \
                    for (int64_t p = 0; p < P; p++) wb[p] += acc[(int64_t)c * P + p];                 \
                free(acc);                                                                            \
            }                                                                                         \
            return 0;                                                                                 \
        }                                                                                             \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (total * k > GRAIN)")     \
        for (int64_t q = 0; q < total; q++) {                                                         \
            int64_t b = q / P, p = q % P;                                                             \
            coef_pair_##SFX(x + b * xbs, xrs, xcs, g + b * gbs, grs, gcs, I[p], J[p], k, w + q);      \
        }                                                                                             \
        return 0;                                                                                     \
    }                                                                                                 \
    /* theta: (B, P) with batch stride tbs (0 = shared). scale likewise (may be NULL). */             \
    static void rotate_core_##SFX(T *x, int64_t xbs, int64_t xrs, int64_t xcs, const int64_t *I,      \
                                  const int64_t *J, int64_t B, int64_t P, int64_t k, const T *theta,  \
                                  int64_t tbs, T mult, const T *scale, int64_t sbs, int nthreads) {   \
        int64_t total = B * P;                                                                        \
        if (xcs == 1) {                                                                               \
            _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (total * k > GRAIN)") \
            for (int64_t q = 0; q < total; q++) {                                                     \
                int64_t b = q / P, p = q % P;                                                         \
                T th = mult * theta[b * tbs + p] * (scale ? scale[b * sbs + p] : (T)1);               \
                rot_pair_##SFX(x + b * xbs, xrs, I[p], J[p], k, CM1(th), SIN(th));                    \
            }                                                                                         \
        } else {                                                                                      \
            /* rows of x are strided: walk the storage rows t, rotating elements (t, I[p]), (t, J[p]) */ \
            for (int64_t b = 0; b < B; b++) {                                                         \
                T *xb = x + b * xbs;                                                                  \
                T cs_buf[2 * 4096];                                                                   \
                for (int64_t p0 = 0; p0 < P; p0 += 4096) {                                            \
                    int64_t pn = P - p0 < 4096 ? P - p0 : 4096;                                       \
                    for (int64_t p = 0; p < pn; p++) {                                                \
                        T th = mult * theta[b * tbs + p0 + p] *                                       \
                               (scale ? scale[b * sbs + p0 + p] : (T)1);                              \
                        cs_buf[2 * p] = CM1(th);                                                      \
                        cs_buf[2 * p + 1] = SIN(th);                                                  \
                    }                                                                                 \
                    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (pn * k > GRAIN)") \
                    for (int64_t t = 0; t < k; t++) {                                                 \
                        T *row = xb + t * xcs;                                                        \
                        for (int64_t p = 0; p < pn; p++) {                                            \
                            T cm1 = cs_buf[2 * p], s = cs_buf[2 * p + 1];                             \
                            T *a = row + I[p0 + p] * xrs, *bb = row + J[p0 + p] * xrs;                \
                            T u = *a, v = *bb;                                                        \
                            *a = u + (cm1 * u + s * v);                                               \
                            *bb = v + (cm1 * v - s * u);                                              \
                        }                                                                             \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    int ot_rotate_##SFX(T *x, int64_t xbs, int64_t xrs, int64_t xcs, const int64_t *I,                \
                        const int64_t *J, int64_t B, int64_t n, int64_t P, int64_t k, const T *theta, \
                        int64_t tbs, int nthreads) {                                                  \
        if (check_idx(I, J, P, n)) return -1;                                                         \
        rotate_core_##SFX(x, xbs, xrs, xcs, I, J, B, P, k, theta, tbs, (T)1, (const T *)0, 0,         \
                          nthreads);                                                                  \
        return 0;                                                                                     \
    }                                                                                                 \
    /* Fused descent step: w = coefficients(x, g); x <- rotate(x, -lr * w * scale). */                \
    int ot_step_##SFX(T *x, int64_t xbs, int64_t xrs, int64_t xcs, const T *g, int64_t gbs,           \
                      int64_t grs, int64_t gcs, const int64_t *I, const int64_t *J, int64_t B,        \
                      int64_t n, int64_t P, int64_t k, T lr, const T *scale, int64_t sbs, T *w,       \
                      int nthreads) {                                                                 \
        if (check_idx(I, J, P, n)) return -1;                                                         \
        int64_t total = B * P;                                                                        \
        if (xcs == 1) {                                                                               \
            _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (total * k > GRAIN)") \
            for (int64_t q = 0; q < total; q++) {                                                     \
                int64_t b = q / P, p = q % P;                                                         \
                T *xb = x + b * xbs;                                                                  \
                coef_pair_##SFX(xb, xrs, 1, g + b * gbs, grs, gcs, I[p], J[p], k, w + q);             \
                T th = -lr * w[q] * (scale ? scale[b * sbs + p] : (T)1);                              \
                rot_pair_##SFX(xb, xrs, I[p], J[p], k, CM1(th), SIN(th));                             \
            }                                                                                         \
            return 0;                                                                                 \
        }                                                                                             \
        ot_coeffs_##SFX(x, xbs, xrs, xcs, g, gbs, grs, gcs, I, J, B, n, P, k, w, nthreads);           \
        rotate_core_##SFX(x, xbs, xrs, xcs, I, J, B, P, k, w, P, -lr, scale, sbs, nthreads);          \
        return 0;                                                                                     \
    }                                                                                                 \
    /* Fused step that also rotates y (e.g. a momentum buffer, possibly y == g) by the same angles;   \
     * rows of x and y contiguous (cs == 1). y is rotated after the pair's coefficient is read. */    \
    int ot_step2_##SFX(T *x, int64_t xbs, int64_t xrs, const T *g, int64_t gbs, int64_t grs,          \
                       int64_t gcs, T *y, int64_t ybs, int64_t yrs, const int64_t *I,                 \
                       const int64_t *J, int64_t B, int64_t n, int64_t P, int64_t k, T lr,            \
                       const T *scale, int64_t sbs, T *w, int nthreads) {                             \
        if (check_idx(I, J, P, n)) return -1;                                                         \
        int64_t total = B * P;                                                                        \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (total * k > GRAIN)")     \
        for (int64_t q = 0; q < total; q++) {                                                         \
            int64_t b = q / P, p = q % P;                                                             \
            T *xb = x + b * xbs;                                                                      \
            coef_pair_##SFX(xb, xrs, 1, g + b * gbs, grs, gcs, I[p], J[p], k, w + q);                 \
            T th = -lr * w[q] * (scale ? scale[b * sbs + p] : (T)1);                                  \
            T cm1 = CM1(th), sn = SIN(th);                                                            \
            rot_pair_##SFX(xb, xrs, I[p], J[p], k, cm1, sn);                                          \
            rot_pair_##SFX(y + b * ybs, yrs, I[p], J[p], k, cm1, sn);                                 \
        }                                                                                             \
        return 0;                                                                                     \
    }

DEFINE_KERNELS(float, f32, cm1_f32, sinf)
DEFINE_KERNELS(double, f64, cm1_f64, sin)

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX)

#define T float
#define SFX f32
#define CM1 cm1_f32
#define SIN sinf
#define SQRT sqrtf
#define FMA fmaf
#include "_givens_steps_impl.c"
#undef T
#undef SFX
#undef CM1
#undef SIN
#undef SQRT
#undef FMA

#define T double
#define SFX f64
#define CM1 cm1_f64
#define SIN sin
#define SQRT sqrt
#define FMA fma
#include "_givens_steps_impl.c"
#undef T
#undef SFX
#undef CM1
#undef SIN
#undef SQRT
#undef FMA

/* Validate a set of pairs for n rows: 0, -1 (index outside [0, n)), -3 (a pair (i, i)) or -4 (a row in
 * two pairs; checked only when disjoint != 0). */
int ot_check_pairs(const int64_t *I, const int64_t *J, int64_t P, int64_t n, int64_t disjoint) {
    for (int64_t p = 0; p < P; p++) {
        if (I[p] < 0 || I[p] >= n || J[p] < 0 || J[p] >= n) return -1;
        if (I[p] == J[p]) return -3;
    }
    if (!disjoint) return 0;
    unsigned char *seen = (unsigned char *)calloc((size_t)n + 1, 1);
    if (!seen) return -2;
    int rc = 0;
    for (int64_t p = 0; p < P && !rc; p++) {
        if (seen[I[p]] || seen[J[p]]) rc = -4;
        seen[I[p]] = seen[J[p]] = 1;
    }
    free(seen);
    return rc;
}

int ot_abi_version(void) { return 7; }
