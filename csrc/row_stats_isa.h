/* The row-statistics kernel, compiled once per instruction set: row_stats.c includes this file
 * under `#pragma GCC target(...)` with ISA defined (avx512, avx2, generic), and NAME(f) gives each
 * copy its own symbols. Vectors are GCC / Clang generic vectors of 16 floats: one zmm register
 * under AVX-512, two ymm under AVX2, four xmm otherwise. */

INLINE vf NAME(vload)(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void NAME(vstore)(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf NAME(as_float)(vi i) { vf f; memcpy(&f, &i, sizeof f); return f; }
INLINE vi NAME(as_int)(vf f) { vi i; memcpy(&i, &f, sizeof i); return i; }

/* mask ? a : b, lane by lane (mask lanes are all ones or all zeros, as comparisons give) */
INLINE vf NAME(vselect)(vi mask, vf a, vf b) {
    return NAME(as_float)((NAME(as_int)(a) & mask) | (NAME(as_int)(b) & ~mask));
}

/* e^x for -87.3 <= x <= 0 (the caller subtracts the row max and clamps: see step below).
 * n = round(x / ln 2) by the 1.5 * 2^23 trick, r = x - n ln 2 in two parts (Cody-Waite,
 * |r| <= ln 2 / 2), e^r by its degree-7 Taylor polynomial (truncation < 6e-9 relative: the result
 * is within ~1 ulp), times 2^n built in the exponent bits (n in [-126, 0]). A NaN stays NaN. */
INLINE vf NAME(vexp_clamped)(vf x) {
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vf r = x - n * 0.693145751953125f;
    r = r - n * 1.428606820309417232e-6f;
    vf p = r * (1.0f / 5040.0f) + (1.0f / 720.0f);
    p = p * r + (1.0f / 120.0f);
    p = p * r + (1.0f / 24.0f);
    p = p * r + (1.0f / 6.0f);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* in unsigned lanes, where the shift is defined for every value (a NaN lane converts to
     * some integer; its product stays NaN) */
    vu bits = ((vu)__builtin_convertvector(n, vi) + 127u) << 23;
    return p * NAME(as_float)((vi)bits);
}

/* one vector of d = z - m (<= 0): e = e^d, 0 below -87.3 (float32's normal range ends there: no
 * subnormals, and a -inf logit gives 0); *dc = d clamped at -87.3, so that dc * e is 0, never
 * -inf * 0, where e is 0. A NaN fails every comparison: it is never clamped and stays NaN. */
INLINE vf NAME(step)(vf d, vf *dc) {
    const vf low = (vf){0} - 87.3f;
    vi under = d < low;
    *dc = NAME(vselect)(under, low, d);
    return NAME(vselect)(under, (vf){0}, NAME(vexp_clamped)(*dc));
}

/* acc (8 doubles, two vectors) += the 16 float lanes of v */
INLINE void NAME(add_wide)(vd *acc, vf v) {
    vh lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    acc[0] += __builtin_convertvector(lo, vd);
    acc[1] += __builtin_convertvector(hi, vd);
}

INLINE double NAME(hsum)(const vd *acc) {
    double x = 0.0;
    for (int l = 0; l < LANES / 2; ++l) x += acc[0][l] + acc[1][l];
    return x;
}

/* s = sum e^{row - m}, t = sum e^{row - m} (row - m) over the row's V columns, writing e^{row - m}
 * over the row when `write` (a constant at each call: the compiler makes two loops). Each float
 * lane sums SUM_VECTORS terms, then goes into double lanes: the sums are within a few double
 * roundings of exact, so lse = m + log s is float32's correctly rounded value but for ties. */
INLINE void NAME(sums)(float *row, int64_t V, float m, int write, double *s, double *t) {
    vd s_acc[2] = {{0}, {0}}, t_acc[2] = {{0}, {0}};
    vf sv = {0}, tv = {0};
    int k = 0;
    int64_t u = 0;
    for (; u + LANES <= V; u += LANES) {
        vf dc, e = NAME(step)(NAME(vload)(row + u) - m, &dc);
        sv += e;
        tv += dc * e;
        if (write) NAME(vstore)(row + u, e);
        if (++k == SUM_VECTORS) {
            NAME(add_wide)(s_acc, sv);
            NAME(add_wide)(t_acc, tv);
            sv = tv = (vf){0};
            k = 0;
        }
    }
    if (u < V) { /* the last < 16 columns, through a padded vector */
        float buf[LANES];
        int n = (int)(V - u);
        for (int l = 0; l < LANES; ++l) buf[l] = l < n ? row[u + l] - m : 0.0f;
        vf dc, e = NAME(step)(NAME(vload)(buf), &dc);
        for (int l = 0; l < n; ++l) {
            sv[l] += e[l];
            tv[l] += dc[l] * e[l];
            if (write) row[u + l] = e[l];
        }
    }
    NAME(add_wide)(s_acc, sv);
    NAME(add_wide)(t_acc, tv);
    *s = NAME(hsum)(s_acc);
    *t = NAME(hsum)(t_acc);
}

/* rows r0 <= r < r1 of z (see gccpo_row_stats in row_stats.c for the contract) */
static void NAME(stats_rows)(float *z, int64_t r0, int64_t r1, int64_t V, int64_t ld,
                             int write_exp, float *lse, float *ent, float *mx) {
    const double hmax = log((double)V);
    for (int64_t r = r0; r < r1; ++r) {
        float *row = z + r * ld;
        /* the max (first read of the row; NaN wins, as torch.amax) */
        vf mv = (vf){0} - INFINITY;
        int64_t v = 0;
        for (; v + LANES <= V; v += LANES) {
            vf a = NAME(vload)(row + v);
            mv = NAME(vselect)((a > mv) | (a != a), a, mv);
        }
        float m = -INFINITY;
        for (; v < V; ++v) m = max_nan(row[v], m);
        for (int l = 0; l < LANES; ++l) m = max_nan(mv[l], m);
        /* the sums (second read, from the core's cache) */
        double s, t;
        if (write_exp) NAME(sums)(row, V, m, 1, &s, &t);
        else NAME(sums)(row, V, m, 0, &s, &t);
        double log_s = log(s), h = log_s - t / s;
        h = h < 0.0 ? 0.0 : (h > hmax ? hmax : h); /* a NaN passes through */
        lse[r] = (float)(m + log_s);
        ent[r] = (float)h;
        mx[r] = m;
    }
}
