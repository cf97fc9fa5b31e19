// layernorm.cu: LayerNorm over the last dimension (floatX tensors; f32 arithmetic, mean and rstd), eps 1e-5, biased variance.
// Row kernels: one warp per row, blockDim.x a multiple of 32.
// Parameter-gradient reduction in two deterministic stages through a scratch buffer:
//   partial[chunk][0][c] = Σ_{rows in chunk} dout·x̂,  partial[chunk][1][c] = Σ_{rows in chunk} dout
//   then dweight[c] += Σ_chunk partial[chunk][0][c], dbias[c] += Σ_chunk partial[chunk][1][c].

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// out = (x − mean)·rstd·weight + bias per row, rstd = 1/√(var + 1e-5); writes out (N,C), mean (N), rstd (N)
extern "C" __global__ void layernorm_forward(floatX* __restrict__ out, float* __restrict__ mean,
                                             float* __restrict__ rstd, const floatX* __restrict__ inp,
                                             const floatX* __restrict__ weight, const floatX* __restrict__ bias,
                                             int N, int C) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;
    const floatX* x = inp + (long long)row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += 32) s += load(x, i);
    float m = warp_sum(s) / (float)C;
    float q = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float d = load(x, i) - m;
        q += d * d;
    }
    float var = warp_sum(q) / (float)C;
    float r = 1.0f / sqrtf(var + 1e-5f);
    floatX* o = out + (long long)row * C;
    for (int i = lane; i < C; i += 32) store(o, i, (load(x, i) - m) * r * load(weight, i) + load(bias, i));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// x̂ = (x−mean)·rstd, g = dout·weight: dinp = rstd·(g − mean(g) − x̂·mean(g·x̂)); adds if accumulate else writes
extern "C" __global__ void layernorm_backward_dinp(floatX* dinp, const floatX* dout, const floatX* __restrict__ inp,
                                                   const floatX* __restrict__ weight, const float* __restrict__ mean,
                                                   const float* __restrict__ rstd, int N, int C, int accumulate) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;
    long long base = (long long)row * C;
    float m = mean[row], r = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float g = load(dout, base + i) * load(weight, i);
        sg += g;
        sgx += g * (load(inp, base + i) - m) * r;
    }
    float mg = warp_sum(sg) / (float)C;
    float mgx = warp_sum(sgx) / (float)C;
    for (int i = lane; i < C; i += 32) {
        float xh = (load(inp, base + i) - m) * r;
        float g = load(dout, base + i) * load(weight, i);
        float d = r * (g - mg - xh * mgx);
        store(dinp, base + i, accumulate ? load(dinp, base + i) + d : d);
    }
}

// partial[chunk][0][c] = Σ_rows dout·x̂, partial[chunk][1][c] = Σ_rows dout over rows [chunk·rpc, (chunk+1)·rpc)
// grid (⌈C/32⌉, chunks), block (32, 8)
extern "C" __global__ void layernorm_backward_params_partial(float* __restrict__ partial,
                                                             const floatX* __restrict__ dout,
                                                             const floatX* __restrict__ inp,
                                                             const float* __restrict__ mean,
                                                             const float* __restrict__ rstd,
                                                             int N, int C, int rows_per_chunk) {
    __shared__ float sw[8][33];
    __shared__ float sb[8][33];
    int tx = threadIdx.x, ty = threadIdx.y;
    int c = blockIdx.x * 32 + tx;
    int chunk = blockIdx.y;
    int r0 = chunk * rows_per_chunk;
    int r1 = min(N, r0 + rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    if (c < C) {
        for (int r = r0 + ty; r < r1; r += 8) {
            long long k = (long long)r * C + c;
            float d = load(dout, k);
            dw += d * (load(inp, k) - mean[r]) * rstd[r];
            db += d;
        }
    }
    sw[ty][tx] = dw;
    sb[ty][tx] = db;
    __syncthreads();
    if (ty == 0 && c < C) {
        float w = 0.0f, b = 0.0f;
#pragma unroll
        for (int y = 0; y < 8; y++) {
            w += sw[y][tx];
            b += sb[y][tx];
        }
        partial[(long long)(2 * chunk) * C + c] = w;
        partial[(long long)(2 * chunk + 1) * C + c] = b;
    }
}

// dweight[c] += Σ_chunk partial[chunk][0][c];  dbias[c] += Σ_chunk partial[chunk][1][c]   (fixed order)
extern "C" __global__ void layernorm_backward_params_finish(floatX* dweight, floatX* dbias,
                                                            const float* __restrict__ partial, int chunks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float w = 0.0f, b = 0.0f;
    for (int k = 0; k < chunks; k++) {
        w += partial[(long long)(2 * k) * C + c];
        b += partial[(long long)(2 * k + 1) * C + c];
    }
    store(dweight, c, load(dweight, c) + w);
    store(dbias, c, load(dbias, c) + b);
}
