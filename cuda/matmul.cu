// matmul.cu: helpers around the cuBLAS matmuls, and the built-in GEMM used when cuBLAS is absent or
// the weight is f16 in an f32 or bf16 launch. floatX storage (common.cuh), f32 arithmetic throughout.

// out[r,o] += bias[o] for r < N, o < OC   (after an f32 GEMM wrote out = inp·Wᵀ)
extern "C" __global__ void add_bias(floatX* out, const floatX* __restrict__ bias, int N, int OC) {
    long long total = (long long)N * OC;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        store(out, i, load(out, i) + load(bias, i % OC));
    }
}

// out[r,o] = bias[o] for r < N, o < OC   (before a GEMM with beta = 1 adds inp·Wᵀ: a 16-bit output
// is then rounded once, from the f32 sum and the bias, as the cpu reference rounds it)
extern "C" __global__ void bias_broadcast(floatX* out, const floatX* __restrict__ bias, int N, int OC) {
    long long total = (long long)N * OC;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = bias[i % OC];
    }
}

// partial[chunk][o] = Σ_{rows r in chunk} dout[r,o];  grid (⌈OC/32⌉, chunks), block (32, 8)
extern "C" __global__ void bias_grad_partial(float* __restrict__ partial, const floatX* __restrict__ dout,
                                             int N, int OC, int rows_per_chunk) {
    __shared__ float sb[8][33];
    int tx = threadIdx.x, ty = threadIdx.y;
    int o = blockIdx.x * 32 + tx;
    int r0 = blockIdx.y * rows_per_chunk;
    int r1 = min(N, r0 + rows_per_chunk);
    float s = 0.0f;
    if (o < OC)
        for (int r = r0 + ty; r < r1; r += 8) s += load(dout, (long long)r * OC + o);
    sb[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && o < OC) {
        float t = 0.0f;
#pragma unroll
        for (int y = 0; y < 8; y++) t += sb[y][tx];
        partial[(long long)blockIdx.y * OC + o] = t;
    }
}

// dbias[o] += Σ_chunk partial[chunk][o]   (fixed order: deterministic)
extern "C" __global__ void bias_grad_finish(floatX* dbias, const float* __restrict__ partial, int chunks, int OC) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= OC) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partial[(long long)k * OC + o];
    store(dbias, o, load(dbias, o) + s);
}

// Built-in GEMM (row-major, arbitrary strides), used when cuBLAS is absent, and for every matmul
// whose weight is f16 in an f32 or bf16 launch (cuBLAS' GemmEx cannot mix an f16 B with an f32 or
// bf16 A; converting the input to f16 would round it, which the contract does not allow):
//   Cm[i,j] = alpha·Σ_k A[i·sam + k·sak]·B[k·sbk + j·sbn] + beta·Cm[i·ldc + j]
// 64×64 output tile per block of 256 threads, 4×4 outputs per thread, K in steps of 16. A and Cm
// are floatX, B floatX (TB = floatX) or f16 (TB = half_t); each value is converted to f32 as the
// tile is staged in shared memory, the products and sums are f32, and each output is stored once.
#define TM 64
#define TN 64
#define TK 16
template <class TB>
__device__ __forceinline__ void gemm_tiles(floatX* Cm, const floatX* __restrict__ A, const TB* __restrict__ B,
                                           int M, int N, int K, long long sam, long long sak, long long sbk,
                                           long long sbn, long long ldc, float alpha, float beta) {
    __shared__ __align__(16) float As[TK][TM + 4];
    __shared__ __align__(16) float Bs[TK][TN + 4];
    int tid = threadIdx.x;
    int tx = tid & 15, ty = tid >> 4;
    int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TK) {
#pragma unroll
        for (int l = 0; l < 4; l++) {
            int e = tid + l * 256;
            int mm, kk;
            if (sak == 1) { kk = e & (TK - 1); mm = e >> 4; }   // k contiguous in memory
            else { mm = e & (TM - 1); kk = e >> 6; }            // m contiguous (or neither)
            int gm = m0 + mm, gk = k0 + kk;
            As[kk][mm] = (gm < M && gk < K) ? load(A, gm * sam + gk * sak) : 0.0f;
            int nn;
            if (sbn == 1) { nn = e & (TN - 1); kk = e >> 6; }   // n contiguous
            else { kk = e & (TK - 1); nn = e >> 4; }            // k contiguous (or neither)
            int gn = n0 + nn;
            gk = k0 + kk;
            Bs[kk][nn] = (gn < N && gk < K) ? load(B, gk * sbk + gn * sbn) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; kk++) {
            float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
            float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
            float av[4] = {a.x, a.y, a.z, a.w};
            float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int gm = m0 + ty * 4 + i;
        if (gm >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int gn = n0 + tx * 4 + j;
            if (gn >= N) continue;
            long long idx = gm * ldc + gn;
            float v = alpha * acc[i][j];
            store(Cm, idx, beta != 0.0f ? v + beta * load(Cm, idx) : v);
        }
    }
}

// B floatX: every matmul shape (forward, dinp, dweight) without cuBLAS
extern "C" __global__ void __launch_bounds__(256) sgemm_fallback(floatX* Cm, const floatX* __restrict__ A,
                                                                 const floatX* __restrict__ B, int M, int N, int K,
                                                                 long long sam, long long sak, long long sbk,
                                                                 long long sbn, long long ldc, float alpha,
                                                                 float beta) {
    gemm_tiles(Cm, A, B, M, N, K, sam, sak, sbk, sbn, ldc, alpha, beta);
}

// B f16 (an f16 weight of a matmul forward: B = W, its rows k-contiguous), with or without cuBLAS
extern "C" __global__ void __launch_bounds__(256) sgemm_fallback_f16b(floatX* Cm, const floatX* __restrict__ A,
                                                                      const half_t* __restrict__ B, int M,
                                                                      int N, int K, long long sam, long long sak,
                                                                      long long sbk, long long sbn, long long ldc,
                                                                      float alpha, float beta) {
    gemm_tiles(Cm, A, B, M, N, K, sam, sak, sbk, sbn, ldc, alpha, beta);
}
