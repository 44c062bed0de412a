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
        /* the sums (second read, from the core's cache), float32 lanes per SUM_BLOCK columns,
         * then double */
        double s = 0.0, t = 0.0;
        for (int64_t c0 = 0; c0 < V; c0 += SUM_BLOCK) {
            int64_t c1 = c0 + SUM_BLOCK < V ? c0 + SUM_BLOCK : V;
            vf sv = {0}, tv = {0};
            int64_t u = c0;
            if (write_exp) {
                for (; u + LANES <= c1; u += LANES) {
                    vf dc, e = NAME(step)(NAME(vload)(row + u) - m, &dc);
                    sv += e;
                    tv += dc * e;
                    NAME(vstore)(row + u, e);
                }
            } else {
                for (; u + LANES <= c1; u += LANES) {
                    vf dc, e = NAME(step)(NAME(vload)(row + u) - m, &dc);
                    sv += e;
                    tv += dc * e;
                }
            }
            if (u < c1) { /* the last < 16 columns, through a padded vector */
                float buf[LANES];
                int k = (int)(c1 - u);
                for (int l = 0; l < LANES; ++l) buf[l] = l < k ? row[u + l] - m : 0.0f;
                vf dc, e = NAME(step)(NAME(vload)(buf), &dc);
                for (int l = 0; l < k; ++l) {
                    sv[l] += e[l];
                    tv[l] += dc[l] * e[l];
                    if (write_exp) row[u + l] = e[l];
                }
            }
            float ss = 0.0f, ts = 0.0f;
            for (int l = 0; l < LANES; ++l) {
                ss += sv[l];
                ts += tv[l];
            }
            s += ss;
            t += ts;
        }
        double log_s = log(s), h = log_s - t / s;
        h = h < 0.0 ? 0.0 : (h > hmax ? hmax : h); /* a NaN passes through */
        lse[r] = (float)(m + log_s);
        ent[r] = (float)h;
        mx[r] = m;
    }
}
