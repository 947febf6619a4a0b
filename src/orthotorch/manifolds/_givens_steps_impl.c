/* Fused multi-matching Givens step, included twice by _givens_kernel.c with
 *   T (float | double), SFX (f32 | f64), CM1 (cos - 1 as -2 sin^2(t/2)), SIN, SQRT.
 *
 * ot_steps_SFX applies m matchings one after another, exactly as m calls of the single-matching step
 * (ot_step2 / ot_step) would, but in one pass over the rows:
 *
 *   if y and update: y <- mu * y + gcoef * g                         (before any rotation touches a row)
 *   for s = 0 .. m-1, for every pair (i, j) of matching s:
 *     mode 0: w = <g_i, x_j> - <x_i, g_j>                            (g fixed, y unused)
 *     mode 1: w = <y_i, x_j> - <x_i, y_j>                            (heavy ball: y drives and is rotated)
 *     mode 2: w = (<g_i, x_j> - <x_i, g_j>) + mu (<y_i, x_j> - <x_i, y_j>)  (Nesterov; y rotated)
 *     theta = -lr * w * scale[q];  rotate rows i, j of x (and of y in modes 1, 2) by theta.
 *
 * ot_adam_steps_SFX is mode 3, OrthogonalAdam's step (y is the first moment m; its update is torch's
 * lerp_, m <- m + (1 - b1)(g - m), applied to a row before any rotation touches it): for each pair,
 *     wg = <g_i, x_j> - <x_i, g_j>,  wm = <m_i, x_j> - <x_i, m_j>   (both on the current rows)
 *     count_i += 1, v_i <- b2 v_i + (1 - b2) wg^2 (amsgrad: vmax_i <- max(vmax_i, v_i), v_i <- vmax_i),
 *     vhat_i = v_i / (1 - b2^count_i); the same for j;
 *     theta = -lr * wm * scale[q] / (sqrt((vhat_i + vhat_j) / 2) + eps);  rotate rows i, j of x and m.
 * The per-row state (v, vmax: (B, n); count: (n,), shared over the batch) of a row is updated only by
 * the pair tasks touching that row, in matching order, so it follows the sequential loop of
 * optim/adam.py exactly. Its scalar arithmetic is written (volatile products) so that the compiler cannot
 * contract it into FMAs: it rounds as the torch ops of that loop do.
 *
 * Layouts. Each of x, g, y is either row-contiguous (column stride 1, any row and batch strides) or
 * column-contiguous (row stride 1: the .mT of a row-major matrix, e.g. the tall view of a wide weight;
 * batch size 1). A rotation of row pairs of a column-major matrix is a rotation of column pairs of its
 * row-major transpose; the kernel handles it by tiles: the first pair task that touches a group of TILE
 * consecutive rows copies that group (TILE contiguous elements of each storage row, whole cache lines)
 * into a row-major tile taken from a small LIFO pool, and the task that applies the group's last touch
 * copies it back. For the round-robin schedule a handful of tiles is live at a time, so the pool stays in
 * cache and every tensor is still read and written about once, whatever its layout. Batched inputs share
 * the matchings; one "pair task" handles pair q for every batch item.
 *
 * Schedule. Pair q of matching s may run once rows I[q] and J[q] have received exactly the matchings
 * before s that contain them (pos_i/pos_j: their counts, precomputed). Each row keeps a counter of the
 * pair tasks applied to it; a task is ready when both counters equal its positions. Every pair task
 * computes the same floating-point operations as in the sequential order, so the result is bitwise the
 * same as the sequential application of the same per-pair arithmetic, whatever the order in which
 * tasks run. Each thread owns a contiguous share of every matching's pairs (even threads walk it
 * upwards, odd threads downwards, so that neighbouring threads meet only at the end), and sweeps the
 * matchings in a wavefront: the lowest unfinished matching advances by one pair, each later matching
 * as far as it is ready. With the round-robin (circle-method) schedule, pair t of round r + s joins rows
 * r + s +- t, so matching s lags matching s - 1 by one pair and the working set is about 2m + 1 rows:
 * the rows stay in cache across the m matchings, and x, g and y are read and written about once.
 */


#ifndef OT_TILE
#define OT_TILE 16
#endif

/* One operand: row-contiguous (direct pointers) or column-contiguous (tiles). */
typedef struct {
    T *base;
    int64_t bs, rs, cs;
    int col;              /* 1: column-contiguous, accessed through tiles */
    int writeback;        /* tiles are copied back (x, y) */
    int64_t n, k, kp, ngroups;
    T *pool;              /* ngroups tiles of TILE * k */
    int32_t *state;       /* per group: 0 unloaded, 1 loading, 2 loaded */
    int32_t *slot;        /* per group: its tile */
    int64_t *remaining;   /* per group: pair-task touches still to come */
    int32_t *free_stack;  /* LIFO of free tiles */
    int32_t top;
    int32_t lock;
} FN(operand);

static void FN(op_lock)(FN(operand) *d) {
    while (__atomic_exchange_n(&d->lock, 1, __ATOMIC_ACQUIRE)) sched_yield();
}
static void FN(op_unlock)(FN(operand) *d) { __atomic_store_n(&d->lock, 0, __ATOMIC_RELEASE); }

/* Copy group G between the column-major storage and tile sl (back = 1: tile to storage), in 16 x 16
 * blocks so that both sides stay in L1; tile rows are padded (kp = k + 16) so that the 16 rows of a tile
 * do not all map to the same cache sets when k is a power of two. */
static void FN(tile_copy)(FN(operand) *d, int64_t G, int32_t sl, int back) {
    T *tile = d->pool + (int64_t)sl * OT_TILE * d->kp;
    int64_t r0 = G * OT_TILE, nr = d->n - r0 < OT_TILE ? d->n - r0 : OT_TILE;
    for (int64_t t0 = 0; t0 < d->k; t0 += 16) {
        int64_t t1 = t0 + 16 < d->k ? t0 + 16 : d->k;
        for (int64_t r = 0; r < nr; r++) {
            T *row = tile + r * d->kp;
            T *col = d->base + r0 + r;
            if (back)
                for (int64_t t = t0; t < t1; t++) col[t * d->cs] = row[t];
            else
                for (int64_t t = t0; t < t1; t++) row[t] = col[t * d->cs];
        }
    }
}

/* Make the tile of row a's group available (loading it if this is the first touch). */
static void FN(op_acquire)(FN(operand) *d, int64_t a) {
    if (!d->col) return;
    int64_t G = a / OT_TILE;
    int32_t st = __atomic_load_n(&d->state[G], __ATOMIC_ACQUIRE);
    if (st == 2) return;
    int32_t expect = 0;
    if (st == 0 && __atomic_compare_exchange_n(&d->state[G], &expect, 1, 0, __ATOMIC_ACQ_REL,
                                               __ATOMIC_ACQUIRE)) {
        FN(op_lock)(d);
        int32_t sl = d->free_stack[--d->top];
        FN(op_unlock)(d);
        d->slot[G] = sl;
        FN(tile_copy)(d, G, sl, 0);
        __atomic_store_n(&d->state[G], 2, __ATOMIC_RELEASE);
        return;
    }
    while (__atomic_load_n(&d->state[G], __ATOMIC_ACQUIRE) != 2) sched_yield();
}

/* Row a as a contiguous pointer (its group acquired). */
static inline T *FN(op_row)(FN(operand) *d, int64_t b, int64_t a) {
    if (!d->base) return 0; /* an operand the mode does not read */
    if (!d->col) return d->base + b * d->bs + a * d->rs;
    return d->pool + ((int64_t)d->slot[a / OT_TILE] * OT_TILE + a % OT_TILE) * d->kp;
}

/* One touch of row a done; the last touch of its group writes the tile back and frees it. */
static void FN(op_release)(FN(operand) *d, int64_t a) {
    if (!d->col) return;
    int64_t G = a / OT_TILE;
    if (__atomic_fetch_sub(&d->remaining[G], 1, __ATOMIC_ACQ_REL) != 1) return;
    int32_t sl = d->slot[G];
    if (d->writeback) {
        FN(tile_copy)(d, G, sl, 1);
    }
    __atomic_store_n(&d->state[G], 0, __ATOMIC_RELEASE);
    FN(op_lock)(d);
    d->free_stack[d->top++] = sl;
    FN(op_unlock)(d);
}

/* Set up an operand; tiles for column-contiguous ones come from a per-thread cache (kept between calls
 * so that the pool pages stay mapped and warm). Returns 0, or -2 when out of memory. */
static __thread T *FN(tl_pool)[3];
static __thread size_t FN(tl_size)[3];

static int FN(op_init)(FN(operand) *d, int which, T *base, int64_t bs, int64_t rs, int64_t cs,
                       int writeback, int64_t n, int64_t k, const int64_t *cnt) {
    d->base = base;
    d->bs = bs;
    d->rs = rs;
    d->cs = cs;
    d->col = base != 0 && cs != 1;
    d->writeback = writeback;
    d->n = n;
    d->k = k;
    d->kp = k + 16;
    d->state = 0;
    d->slot = 0;
    d->remaining = 0;
    d->free_stack = 0;
    d->top = 0;
    d->lock = 0;
    if (!d->col) return 0;
    d->ngroups = (n + OT_TILE - 1) / OT_TILE;
    size_t need = (size_t)d->ngroups * OT_TILE * (size_t)d->kp;
    if (FN(tl_size)[which] < need) {
        free(FN(tl_pool)[which]);
        FN(tl_pool)[which] = (T *)malloc(need * sizeof(T));
        FN(tl_size)[which] = FN(tl_pool)[which] ? need : 0;
        if (!FN(tl_pool)[which]) return -2;
    }
    d->pool = FN(tl_pool)[which];
    d->state = (int32_t *)calloc((size_t)d->ngroups, sizeof(int32_t));
    d->slot = (int32_t *)calloc((size_t)d->ngroups, sizeof(int32_t));
    d->remaining = (int64_t *)calloc((size_t)d->ngroups, sizeof(int64_t));
    d->free_stack = (int32_t *)malloc(sizeof(int32_t) * (size_t)d->ngroups);
    if (!d->state || !d->slot || !d->remaining || !d->free_stack) return -2;
    for (int64_t G = 0; G < d->ngroups; G++) d->free_stack[G] = (int32_t)(d->ngroups - 1 - G);
    d->top = (int32_t)d->ngroups;
    for (int64_t r = 0; r < n; r++) d->remaining[r / OT_TILE] += cnt[r];
    return 0;
}

static void FN(op_free)(FN(operand) *d) {
    free(d->state);
    free(d->slot);
    free(d->remaining);
    free(d->free_stack);
}

/* Mode 3 (Adam): per-row second moments and the first moment's lerp coefficients. */
typedef struct {
    T *row_sq;         /* (B, n), batch stride n */
    T *count;          /* (n,), shared over the batch */
    T *max_sq;         /* (B, n) running maximum (amsgrad), or NULL */
    T beta2, c2, eps;  /* c2 = 1 - beta2, rounded once from double (as torch rounds the scalar) */
    T lerp_coeff;      /* lerp weight w (w < 0.5) or w - 1 (w >= 0.5), as torch's vectorised lerp */
    int lerp_from_g;   /* 0: m + w (g - m);  1: g + (w - 1)(g - m) */
    int64_t n;
    T *bc;             /* 1 - beta2^c for the integer counts c = bc_lo .. bc_lo + bc_len - 1, or NULL */
    double bc_lo;
    int64_t bc_len;
} FN(adam_rows);

/* Bias correction 1 - beta2^c: from the table when c is one of its counts (a round-robin step needs
 * only m distinct counts, so the table saves two pow calls per pair), else computed; both give the same
 * bits. */
static inline T FN(bias)(const FN(adam_rows) *ad, T c) {
    double idx = (double)c - ad->bc_lo;
    if (ad->bc && idx >= 0 && idx < (double)ad->bc_len && idx == floor(idx)) return ad->bc[(int64_t)idx];
    return (T)1 - (T)pow((double)ad->beta2, (double)c);
}

/* torch's vectorised lerp: base + c (g - m) as one fused multiply-add where the CPU has one. */
#ifndef OT_LERP
#if defined(__FMA__) || defined(__aarch64__)
#define OT_LERP(base, c, d) FMA((c), (d), (base))
#else
#define OT_LERP(base, c, d) ((base) + (c) * (d))
#endif
#endif

/* m <- lerp(m, g, w) on k contiguous elements (torch.lerp_'s arithmetic). */
static inline void FN(lerp_row)(T *m, const T *g, int64_t k, const FN(adam_rows) *ad) {
    T c = ad->lerp_coeff;
    if (ad->lerp_from_g) {
        _Pragma("omp simd") for (int64_t t = 0; t < k; t++) m[t] = OT_LERP(g[t], c, g[t] - m[t]);
    } else {
        _Pragma("omp simd") for (int64_t t = 0; t < k; t++) m[t] = OT_LERP(m[t], c, g[t] - m[t]);
    }
}

/* torch.maximum: NaN if either is NaN. */
static inline T FN(max_nan)(T a, T b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

/* v <- b2 v + c2 w2 with each product rounded (no FMA), as the torch expression does. */
static inline T FN(ema)(T v, T w2, const FN(adam_rows) *ad) {
    volatile T p = ad->beta2 * v;
    volatile T q = ad->c2 * w2;
    return p + q;
}

static void FN(steps_pair)(FN(operand) *X, FN(operand) *Gd, FN(operand) *Y, int64_t a, int64_t bq,
                           int first_a, int first_b, int64_t B, int64_t k, T lr, T sc, int64_t mode,
                           int64_t update, T mu, T gcoef, T *wout, int64_t wstride,
                           const FN(adam_rows) *ad) {
    FN(op_acquire)(X, a);
    FN(op_acquire)(X, bq);
    FN(op_acquire)(Gd, a);
    FN(op_acquire)(Gd, bq);
    if (mode) {
        FN(op_acquire)(Y, a);
        FN(op_acquire)(Y, bq);
    }
    T bc_a = 1, bc_b = 1;
    if (mode == 3) {
        /* the count is shared over the batch: one increment (and one bias correction) per task */
        T ca = ad->count[a] + (T)1, cb = ad->count[bq] + (T)1;
        ad->count[a] = ca;
        ad->count[bq] = cb;
        bc_a = FN(bias)(ad, ca);
        bc_b = FN(bias)(ad, cb);
    }
    for (int64_t b = 0; b < B; b++) {
        T *xi = FN(op_row)(X, b, a), *xj = FN(op_row)(X, b, bq);
        const T *gi = FN(op_row)(Gd, b, a), *gj = FN(op_row)(Gd, b, bq);
        T *yi = 0, *yj = 0;
        if (mode) {
            yi = FN(op_row)(Y, b, a);
            yj = FN(op_row)(Y, b, bq);
            if (mode == 3) {
                if (update && first_a) FN(lerp_row)(yi, gi, k, ad);
                if (update && first_b) FN(lerp_row)(yj, gj, k, ad);
            } else {
                if (update && first_a) {
                    _Pragma("omp simd") for (int64_t t = 0; t < k; t++) yi[t] = mu * yi[t] + gcoef * gi[t];
                }
                if (update && first_b) {
                    _Pragma("omp simd") for (int64_t t = 0; t < k; t++) yj[t] = mu * yj[t] + gcoef * gj[t];
                }
            }
        }
        T w, scb = sc;
        if (mode == 0) {
            T p = 0, q = 0;
            _Pragma("omp simd reduction(+ : p, q)") for (int64_t t = 0; t < k; t++) {
                p += gi[t] * xj[t];
                q += xi[t] * gj[t];
            }
            w = p - q;
        } else if (mode == 1) {
            T p = 0, q = 0;
            _Pragma("omp simd reduction(+ : p, q)") for (int64_t t = 0; t < k; t++) {
                p += yi[t] * xj[t];
                q += xi[t] * yj[t];
            }
            w = p - q;
        } else if (mode == 2) {
            T p = 0, q = 0, r = 0, u = 0;
            _Pragma("omp simd reduction(+ : p, q, r, u)") for (int64_t t = 0; t < k; t++) {
                p += gi[t] * xj[t];
                q += xi[t] * gj[t];
                r += yi[t] * xj[t];
                u += xi[t] * yj[t];
            }
            w = (p - q) + mu * (r - u);
        } else {
            T p = 0, q = 0, r = 0, u = 0;
            _Pragma("omp simd reduction(+ : p, q, r, u)") for (int64_t t = 0; t < k; t++) {
                p += gi[t] * xj[t];
                q += xi[t] * gj[t];
                r += yi[t] * xj[t];
                u += xi[t] * yj[t];
            }
            T wg = p - q, w2 = wg * wg;
            T *rs = ad->row_sq + b * ad->n;
            T va = FN(ema)(rs[a], w2, ad), vb = FN(ema)(rs[bq], w2, ad);
            rs[a] = va;
            rs[bq] = vb;
            if (ad->max_sq) {
                T *mx = ad->max_sq + b * ad->n;
                va = mx[a] = FN(max_nan)(mx[a], va);
                vb = mx[bq] = FN(max_nan)(mx[bq], vb);
            }
            T pv = (T)0.5 * (va / bc_a + vb / bc_b);
            T inv = (T)1 / (SQRT(pv) + ad->eps);
            scb = inv * sc;
            w = r - u;
        }
        if (wout) wout[b * wstride] = w;
        T th = -lr * w * scb;
        T cm1 = CM1(th), s = SIN(th);
        _Pragma("omp simd") for (int64_t t = 0; t < k; t++) {
            T u = xi[t], v = xj[t];
            xi[t] = u + (cm1 * u + s * v);
            xj[t] = v + (cm1 * v - s * u);
        }
        if (mode) {
            _Pragma("omp simd") for (int64_t t = 0; t < k; t++) {
                T u = yi[t], v = yj[t];
                yi[t] = u + (cm1 * u + s * v);
                yj[t] = v + (cm1 * v - s * u);
            }
        }
    }
    FN(op_release)(X, a);
    FN(op_release)(X, bq);
    FN(op_release)(Gd, a);
    FN(op_release)(Gd, bq);
    if (mode) {
        FN(op_release)(Y, a);
        FN(op_release)(Y, bq);
    }
}

/* Strides: (batch, row, column) of each operand; each must have column stride 1 or row stride 1 (then
 * B == 1). y may be NULL (mode 0). scale: one multiplier per pair (NULL: 1), shared over the batch.
 * wout (may be NULL): (B, total) driving coefficients w of every pair, as computed before its rotation. */
static int FN(steps_core)(T *x, int64_t xbs, int64_t xrs, int64_t xcs, const T *g, int64_t gbs,
                         int64_t grs, int64_t gcs, T *y, int64_t ybs, int64_t yrs, int64_t ycs,
                         const int64_t *I, const int64_t *J, const int64_t *off, int64_t m, int64_t B,
                         int64_t n, int64_t k, T lr, const T *scale, int64_t mode, int64_t update, T mu,
                         T gcoef, T *wout, FN(adam_rows) *ad, int nthreads) {
    int64_t total = off[m];
    int rc = 0, fail = 0;
    FN(operand) X, Gd, Y;
    int64_t *pos = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * total + 1));
    int64_t *cnt = (int64_t *)calloc((size_t)n + 1, sizeof(int64_t));
    int64_t *mark = (int64_t *)malloc(sizeof(int64_t) * ((size_t)n + 1));
    int32_t *ver = (int32_t *)calloc((size_t)n + 1, sizeof(int32_t));
    memset(&X, 0, sizeof X);
    memset(&Gd, 0, sizeof Gd);
    memset(&Y, 0, sizeof Y);
    if (!pos || !cnt || !mark || !ver) {
        rc = -2;
        goto done;
    }
    if (!mode) y = 0;
    if (mode < 0 || mode > 3 || (mode == 3 && (!y || !ad || !ad->row_sq || !ad->count))) {
        rc = -6; /* inconsistent arguments (a caller bug): nothing written */
        goto done;
    }
    if ((xcs != 1 && (xrs != 1 || B != 1)) || (gcs != 1 && (grs != 1 || B != 1)) ||
        (y && ycs != 1 && (yrs != 1 || B != 1))) {
        rc = -5; /* layout not supported: the caller converts */
        goto done;
    }
    for (int64_t r = 0; r < n; r++) mark[r] = -1;
    /* validate (nothing is written before this loop ends) and precompute the positions */
    for (int64_t s = 0; s < m && !rc; s++) {
        for (int64_t q = off[s]; q < off[s + 1]; q++) {
            int64_t a = I[q], bq = J[q];
            if (a < 0 || a >= n || bq < 0 || bq >= n) { rc = -1; break; }
            if (a == bq) { rc = -3; break; }
            if (mark[a] == s || mark[bq] == s) { rc = -4; break; }
            mark[a] = s;
            mark[bq] = s;
            pos[2 * q] = cnt[a]++;
            pos[2 * q + 1] = cnt[bq]++;
        }
    }
    if (rc) goto done;
    if (mode == 3) {
        /* the counts this call reaches: row r goes from count[r] + 1 to count[r] + cnt[r] */
        double lo = 0, hi = -1;
        for (int64_t r = 0; r < n; r++) {
            if (!cnt[r]) continue;
            double c0 = (double)ad->count[r] + 1, c1 = (double)ad->count[r] + (double)cnt[r];
            if (hi < lo) lo = c0, hi = c1;
            lo = c0 < lo ? c0 : lo;
            hi = c1 > hi ? c1 : hi;
        }
        if (hi >= lo && hi - lo < 65536 && lo == floor(lo)) {
            ad->bc_len = (int64_t)(hi - lo) + 1;
            ad->bc_lo = lo;
            ad->bc = (T *)malloc(sizeof(T) * (size_t)ad->bc_len);
            if (!ad->bc) {
                rc = -2;
                goto done;
            }
            for (int64_t c = 0; c < ad->bc_len; c++)
                ad->bc[c] = (T)1 - (T)pow((double)ad->beta2, lo + (double)c);
        }
    }
    if ((rc = FN(op_init)(&X, 0, x, xbs, xrs, xcs, 1, n, k, cnt))) goto done;
    /* heavy ball without the buffer update never reads g: no tiles for it */
    if ((rc = FN(op_init)(&Gd, 1, (mode == 1 && !update) ? (T *)0 : (T *)g, gbs, grs, gcs, 0, n, k,
                          cnt)))
        goto done;
    if ((rc = FN(op_init)(&Y, 2, y, ybs, yrs, y ? ycs : 1, 1, n, k, cnt))) goto done;
    int nt = (total * k * B > GRAIN && nthreads > 1) ? nthreads : 1;
    _Pragma("omp parallel num_threads(nt)") {
        int c = 0, ntr = 1;
#ifdef _OPENMP
        c = omp_get_thread_num();
        ntr = omp_get_num_threads();
#endif
        int64_t *ptr = (int64_t *)calloc((size_t)m + 1, sizeof(int64_t));
        if (!ptr) {
            __atomic_store_n(&fail, 1, __ATOMIC_RELAXED);
        } else {
            int asc = (c % 2) == 0;
            int64_t lowest = 0;
            while (lowest < m && !__atomic_load_n(&fail, __ATOMIC_RELAXED)) {
                int progressed = 0;
                for (int64_t s = lowest; s < m; s++) {
                    int64_t ps = off[s + 1] - off[s];
                    int64_t lo = ps * c / ntr, hi = ps * (c + 1) / ntr, own = hi - lo;
                    int64_t budget = (s == lowest) ? 1 : own;
                    while (ptr[s] < own && budget > 0) {
                        int64_t q = off[s] + (asc ? lo + ptr[s] : hi - 1 - ptr[s]);
                        int64_t a = I[q], bq = J[q];
                        if (__atomic_load_n(&ver[a], __ATOMIC_ACQUIRE) != pos[2 * q] ||
                            __atomic_load_n(&ver[bq], __ATOMIC_ACQUIRE) != pos[2 * q + 1])
                            break;
                        FN(steps_pair)(&X, &Gd, &Y, a, bq, pos[2 * q] == 0, pos[2 * q + 1] == 0, B, k,
                                       lr, scale ? scale[q] : (T)1, mode, update, mu, gcoef,
                                       wout ? wout + q : (T *)0, total, ad);
                        __atomic_store_n(&ver[a], (int32_t)(pos[2 * q] + 1), __ATOMIC_RELEASE);
                        __atomic_store_n(&ver[bq], (int32_t)(pos[2 * q + 1] + 1), __ATOMIC_RELEASE);
                        ptr[s]++;
                        budget--;
                        progressed = 1;
                    }
                    if (s == lowest && ptr[s] == own) lowest++;
                }
                if (!progressed) sched_yield();
            }
            free(ptr);
        }
    }
    if (fail) {
        rc = -2;
        goto done;
    }
    /* rows no matching touches still get the buffer update (tiles are all written back by now) */
    if (y && update) {
        for (int64_t r = 0; r < n; r++) {
            if (cnt[r]) continue;
            for (int64_t b = 0; b < B; b++) {
                for (int64_t t = 0; t < k; t++) {
                    T *yr = y + b * ybs + r * yrs + t * ycs;
                    T gv = g[b * gbs + r * grs + t * gcs];
                    if (mode == 3)
                        *yr = OT_LERP(ad->lerp_from_g ? gv : *yr, ad->lerp_coeff, gv - *yr);
                    else
                        *yr = mu * *yr + gcoef * gv;
                }
            }
        }
    }
done:
    if (ad) {
        free(ad->bc);
        ad->bc = 0;
    }
    FN(op_free)(&X);
    FN(op_free)(&Gd);
    FN(op_free)(&Y);
    free(pos);
    free(cnt);
    free(mark);
    free(ver);
    return rc;
}

int FN(ot_steps)(T *x, int64_t xbs, int64_t xrs, int64_t xcs, const T *g, int64_t gbs, int64_t grs,
                 int64_t gcs, T *y, int64_t ybs, int64_t yrs, int64_t ycs, const int64_t *I,
                 const int64_t *J, const int64_t *off, int64_t m, int64_t B, int64_t n, int64_t k, T lr,
                 const T *scale, int64_t mode, int64_t update, T mu, T gcoef, T *wout, int nthreads) {
    if (mode == 3) return -6; /* the Adam mode has its own entry point (it needs the row state) */
    return FN(steps_core)(x, xbs, xrs, xcs, g, gbs, grs, gcs, y, ybs, yrs, ycs, I, J, off, m, B, n, k,
                          lr, scale, mode, update, mu, gcoef, wout, (FN(adam_rows) *)0, nthreads);
}

/* Mode 3: OrthogonalAdam's m matchings in one pass (see the top of this file). mom: the first moment
 * (same layouts as y of ot_steps); update: apply mom.lerp_(g, w) before the rotations (w = 1 - beta1;
 * torch's form: m + w (g - m) for |w| < 0.5, else g + (w - 1)(g - m)). row_sq, max_sq (NULL without
 * amsgrad): (B, n) contiguous; count: (n,). Everything is validated before anything is written. */
int FN(ot_adam_steps)(T *x, int64_t xbs, int64_t xrs, int64_t xcs, const T *g, int64_t gbs,
                      int64_t grs, int64_t gcs, T *mom, int64_t mbs, int64_t mrs, int64_t mcs,
                      const int64_t *I, const int64_t *J, const int64_t *off, int64_t m, int64_t B,
                      int64_t n, int64_t k, T lr, const T *scale, int64_t update, T lerp_w, T *row_sq,
                      T *count, T *max_sq, T beta2, T c2, T eps, int nthreads) {
    FN(adam_rows) ad;
    ad.row_sq = row_sq;
    ad.count = count;
    ad.max_sq = max_sq;
    ad.beta2 = beta2;
    ad.c2 = c2;
    ad.eps = eps;
    ad.lerp_from_g = !(fabs((double)lerp_w) < 0.5);
    ad.lerp_coeff = ad.lerp_from_g ? lerp_w - (T)1 : lerp_w;
    ad.n = n;
    ad.bc = 0;
    ad.bc_lo = 0;
    ad.bc_len = 0;
    return FN(steps_core)(x, xbs, xrs, xcs, g, gbs, grs, gcs, mom, mbs, mrs, mcs, I, J, off, m, B, n, k,
                          lr, scale, 3, update, (T)0, (T)0, (T *)0, &ad, nthreads);
}
