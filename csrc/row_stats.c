/* Row statistics of a float32 logits tile: the CPU path of the fused policy loss's in-forward
 * gradient (gccpo_kernels/chunked/loss_grad.py, loaded by gccpo_kernels/_native.py through
 * ctypes). Why it exists and what it measured: csrc/README.md.
 *
 * int gccpo_row_stats(z, rows, V, ld, write_exp, lse, ent, mx, threads)
 *   z [rows, V] float32, row stride ld >= V elements. For each row r:
 *     m      = max_v z[r, v]                                  (NaN if the row holds a NaN)
 *     s      = sum_v e^{z[r, v] - m},  t = sum_v e^{z[r, v] - m} (z[r, v] - m)
 *     lse[r] = m + log s,  ent[r] = clamp(log s - t / s, 0, log V),  mx[r] = m
 *   and, when write_exp != 0, z[r, v] = e^{z[r, v] - m} in place (softmax p = z e^{m - lse}).
 *   Two reads of each row (the max; then the sums while the row is in the core's cache) and, with
 *   write_exp, one write: ~3 flops + one exp per element. Rows are split over `threads` threads
 *   (the caller passes torch's intra-op thread count): OpenMP's when built with -fopenmp (setup.py
 *   does; then, on a torch that ships GNU OpenMP, torch's own workers: see below), else POSIX
 *   threads started per call. A row's result is the same bits whatever the split. Returns 0, or
 *   -1 on bad arguments. A row of all -inf gives NaN (as the torch passes do).
 *
 * int gccpo_row_stats_isa(void): the instruction set the dispatcher picked on this CPU:
 *   2 AVX-512 (F, DQ, BW, VL), 1 AVX2 + FMA, 0 generic.
 * int gccpo_row_stats_force_isa(int isa): use a lower one (tests), -1 for the best again.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* only for the module init below: setuptools builds this as an extension */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef float vh __attribute__((vector_size(32)));  /* half of a vf */
typedef double vd __attribute__((vector_size(64))); /* 8 doubles */
#define LANES 16
#define SUM_VECTORS 4 /* float32 terms per lane before they go into double lanes */
#define INLINE static inline __attribute__((always_inline))

static inline float max_nan(float a, float m) { return (a > m || a != a) ? a : m; }

#define NAME_JOIN(f, s) f##_##s
#define NAME_EXPAND(f, s) NAME_JOIN(f, s)
#define NAME(f) NAME_EXPAND(f, ISA)

#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#define ISA avx512
#include "row_stats_isa.h"
#undef ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ISA avx2
#include "row_stats_isa.h"
#undef ISA
#pragma GCC pop_options
#endif
#define ISA generic
#include "row_stats_isa.h"
#undef ISA

typedef void (*stats_fn)(float *, int64_t, int64_t, int64_t, int64_t, int, float *, float *,
                         float *);

/* the best instruction set this CPU runs: 2 AVX-512, 1 AVX2 + FMA, 0 generic */
static int best_isa(void) {
#ifdef HAVE_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

static int forced_isa = -1; /* gccpo_row_stats_force_isa: the tests run every variant */

static stats_fn pick(int *isa) {
    int best = best_isa();
    *isa = forced_isa >= 0 && forced_isa < best ? forced_isa : best;
#ifdef HAVE_X86_VARIANTS
    if (*isa == 2) return stats_rows_avx512;
    if (*isa == 1) return stats_rows_avx2;
#endif
    return stats_rows_generic;
}

int gccpo_row_stats_isa(void) {
    int isa;
    pick(&isa);
    return isa;
}

/* Use instruction set `isa` (at most the best this CPU runs) from now on, or the best with -1;
 * returns the one in use. Process-wide: for tests, not for concurrent callers. */
int gccpo_row_stats_force_isa(int isa) {
    forced_isa = isa < 0 ? -1 : isa;
    return gccpo_row_stats_isa();
}

#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_THREADS 256

#ifndef _OPENMP
typedef struct {
    stats_fn fn;
    float *z;
    int64_t r0, r1, V, ld;
    int write_exp;
    float *lse, *ent, *mx;
} job_t;

static void *run_job(void *arg) {
    job_t *j = arg;
    j->fn(j->z, j->r0, j->r1, j->V, j->ld, j->write_exp, j->lse, j->ent, j->mx);
    return NULL;
}
#endif

int gccpo_row_stats(float *z, int64_t rows, int64_t V, int64_t ld, int write_exp, float *lse,
                    float *ent, float *mx, int threads) {
    if (!z || !lse || !ent || !mx || rows < 0 || V < 1 || ld < V) return -1;
    if (rows == 0) return 0;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if ((int64_t)threads > rows) threads = (int)rows;
    int isa;
    stats_fn fn = pick(&isa);
#ifdef _OPENMP
    /* OpenMP: on a torch that ships GNU OpenMP (the PyPI wheels on Linux), libgomp.so.1 is the
     * runtime torch already loaded (the loader matches the SONAME), so these are torch's own
     * worker threads, awake and spinning after the GEMM before; threads of our own would share
     * the cores with them for the length of their spin (~20 ms here). Under another runtime
     * (Intel's or LLVM's OpenMP) a second pool starts: correct, without that benefit. */
#pragma omp parallel num_threads(threads)
    {
        int i = omp_get_thread_num(), n = omp_get_num_threads();
        fn(z, rows * i / n, rows * (i + 1) / n, V, ld, write_exp, lse, ent, mx);
    }
#else
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    for (int i = 0; i < threads; ++i) {
        job_t j = {fn, z, rows * i / threads, rows * (i + 1) / threads, V, ld, write_exp,
                   lse, ent, mx};
        jobs[i] = j;
    }
    for (int i = 1; i < threads; ++i)
        started[i] = pthread_create(&tid[i], NULL, run_job, &jobs[i]) == 0;
    run_job(&jobs[0]);
    for (int i = 1; i < threads; ++i) {
        if (started[i]) pthread_join(tid[i], NULL);
        else run_job(&jobs[i]); /* no thread could start: this one does those rows */
    }
#endif
    return 0;
}

/* An importable (empty) module, so that the package's finders locate the shared object. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_row_stats",
                                    "gccpo's compiled row statistics (called through ctypes).",
                                    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__row_stats(void) { return PyModule_Create(&module); }
