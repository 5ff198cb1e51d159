/* cblas_sgemm for MLX's CPU backend that sends matrix-vector products to cblas_sgemv.

MLX's CPU matmul calls cblas_sgemm for every float32 product, also when one side is a single row (a decode
step). OpenBLAS's sgemm packs the whole weight matrix first and streams it at about a quarter of the memory
bandwidth its sgemv reaches on the same matrix (8 against 32 GB/s here). Loaded with RTLD_GLOBAL before MLX,
this library's cblas_sgemm is the one MLX binds; it forwards M == 1 or N == 1 to the real library's sgemv
and everything else to the real sgemm. Only CblasRowMajor is forwarded (what MLX passes). */
#include <dlfcn.h>
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static long forwarded_calls;  /* read by the tests: proves the products took this path */

/* Binds the real BLAS (already loaded by the caller); returns 0 on success. */
int gemv_forward_init(const char *blas_path) {
    void *blas = dlopen(blas_path, RTLD_NOW | RTLD_GLOBAL);
    if (!blas) return 1;
    real_sgemm = (sgemm_fn)dlsym(blas, "cblas_sgemm");
    real_sgemv = (sgemv_fn)dlsym(blas, "cblas_sgemv");
    return real_sgemm && real_sgemv ? 0 : 2;
}

long gemv_forward_calls(void) { return forwarded_calls; }

/* sgemv reads y when beta is 0 in some OpenBLAS versions (0 * NaN): MLX's output buffers are uninitialised. */
static void clear(float *y, int n, int inc) {
    for (int i = 0; i < n; i++) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (order != ROW_MAJOR || !real_sgemv || (m != 1 && n != 1) || k == 0) {
        real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    forwarded_calls++;
    if (m == 1) {
        /* c[0, :] = alpha * op(B)^T x + beta * c, x the single row of op(A) */
        int inc_x = trans_a == NO_TRANS ? 1 : lda;
        if (beta == 0.0f) clear(c, n, 1);
        if (trans_b == NO_TRANS)  /* B is k x n */
            real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_x, beta, c, 1);
        else                      /* B is n x k */
            real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_x, beta, c, 1);
        return;
    }
    /* n == 1: c[:, 0] = alpha * op(A) x + beta * c, x the single column of op(B) */
    int inc_x = trans_b == NO_TRANS ? ldb : 1;
    if (beta == 0.0f) clear(c, m, ldc);
    if (trans_a == NO_TRANS)      /* A is m x k */
        real_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_x, beta, c, ldc);
    else                          /* A is k x m */
        real_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_x, beta, c, ldc);
}
