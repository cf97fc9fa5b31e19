// A stand-in for libcublas/libcublasLt, for testing only: handle management and a plain
// column-major SGEMM (float64 accumulation) on host memory, with cuBLAS's argument checks.
#include <cstdint>
#include <cstdlib>
extern "C" {
int cublasLtCreate(void** h) {
    static int o;
    *h = &o;
    return 0;
}
int cublasLtDestroy(void*) { return 0; }
int cublasCreate_v2(void** h) {
    static int o;
    const char* fail = getenv("WGPT_CUDA_EMU_CUBLAS_FAIL");
    if (fail && *fail == '1') return 1;  // CUBLAS_STATUS_NOT_INITIALIZED, as with a too-old driver
    *h = &o;
    return 0;
}
int cublasDestroy_v2(void*) { return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }
int cublasSetMathMode(void*, int) { return 0; }
// C (m×n, ldc) = alpha·op(A)·op(B) + beta·C; op(A) is m×k, op(B) is k×n; 0 = N, 1 = T
int cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda,
                   const float* B, int ldb, const float* beta, float* C, int ldc) {
    const int INVALID_VALUE = 7;
    if (m < 0 || n < 0 || k < 0 || (ta != 0 && ta != 1) || (tb != 0 && tb != 1)) return INVALID_VALUE;
    if (lda < (ta == 0 ? (m > 1 ? m : 1) : (k > 1 ? k : 1))) return INVALID_VALUE;
    if (ldb < (tb == 0 ? (k > 1 ? k : 1) : (n > 1 ? n : 1))) return INVALID_VALUE;
    if (ldc < (m > 1 ? m : 1)) return INVALID_VALUE;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0;
            for (int l = 0; l < k; l++) {
                float a = ta == 0 ? A[i + (int64_t)l * lda] : A[l + (int64_t)i * lda];
                float b = tb == 0 ? B[l + (int64_t)j * ldb] : B[j + (int64_t)l * ldb];
                s += (double)a * b;
            }
            float v = *alpha * (float)s;
            float* c = &C[i + (int64_t)j * ldc];
            *c = *beta != 0.0f ? v + *beta * *c : v;  // beta == 0: C is not read (may hold NaNs)
        }
    return 0;
}
}
