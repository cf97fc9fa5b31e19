// A stand-in for libcublas/libcublasLt, for testing only: handle management, a plain
// column-major SGEMM (float64 accumulation) and GemmEx (16-bit A, B, C with f32 compute) on host
// memory, with cuBLAS's argument checks.
#include <cstdint>
#include <cstdlib>
#include <cstring>

// 16-bit storage for GemmEx, converted independently of cuda/common.cuh: f16 through the
// compiler's _Float16 (IEEE round to nearest even), bf16 by hand.
static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    uint32_t lsb = (u >> 16) & 1u;
    return (uint16_t)((u + 0x7fffu + lsb) >> 16);
}
enum { R_32F = 0, R_16F = 2, R_16BF = 14, COMPUTE_32F = 68 };
static float ld16(const void* p, int64_t i, int type) {
    if (type == R_16F) return (float)((const _Float16*)p)[i];
    return bf16_to_f32(((const uint16_t*)p)[i]);
}
static void st16(void* p, int64_t i, int type, float v) {
    if (type == R_16F) ((_Float16*)p)[i] = (_Float16)v;
    else ((uint16_t*)p)[i] = f32_to_bf16(v);
}
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
// The same product with A, B and C all CUDA_R_16F or all CUDA_R_16BF and CUBLAS_COMPUTE_32F (the
// combinations the backend uses; others are CUBLAS_STATUS_NOT_SUPPORTED): inputs converted to f32,
// f32 sums, v = alpha·sum + beta·C in f32, one rounding into C.
int cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int at, int lda,
                 const void* B, int bt, int ldb, const void* beta, void* C, int ct, int ldc, int compute, int) {
    const int INVALID_VALUE = 7, NOT_SUPPORTED = 15;
    if ((at != R_16F && at != R_16BF) || bt != at || ct != at || compute != COMPUTE_32F) return NOT_SUPPORTED;
    if (m < 0 || n < 0 || k < 0 || (ta != 0 && ta != 1) || (tb != 0 && tb != 1)) return INVALID_VALUE;
    if (lda < (ta == 0 ? (m > 1 ? m : 1) : (k > 1 ? k : 1))) return INVALID_VALUE;
    if (ldb < (tb == 0 ? (k > 1 ? k : 1) : (n > 1 ? n : 1))) return INVALID_VALUE;
    if (ldc < (m > 1 ? m : 1)) return INVALID_VALUE;
    float al = *(const float*)alpha, be = *(const float*)beta;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = 0.0f;
            for (int l = 0; l < k; l++) {
                float a = ld16(A, ta == 0 ? i + (int64_t)l * lda : l + (int64_t)i * lda, at);
                float b = ld16(B, tb == 0 ? l + (int64_t)j * ldb : j + (int64_t)l * ldb, bt);
                s += a * b;
            }
            int64_t c = i + (int64_t)j * ldc;
            float v = al * s;
            st16(C, c, ct, be != 0.0f ? v + be * ld16(C, c, ct) : v);  // beta == 0: C is not read
        }
    return 0;
}
}
