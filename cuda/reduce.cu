// reduce.cu: gradient-norm reductions on the device (floatX gradients, f32 sums). Zero is a memset on the host side.
// Block reductions assume blockDim.x == 256. Deterministic: fixed grid, fixed combination order.

#define NT 256

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// returns Σ v over the block to every thread (blockDim.x == NT)
__device__ float block_sum(float v) {
    __shared__ float s[NT / 32];
    __shared__ float total;
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < NT / 32 ? s[threadIdx.x] : 0.0f;
        w = warp_sum(w);
        if (threadIdx.x == 0) total = w;
    }
    __syncthreads();
    return total;
}

// partial[block] = Σ_{i in this block's grid-stride share} x[i]²
extern "C" __global__ void sum_squares_partial(float* __restrict__ partial, const floatX* __restrict__ x, long long n) {
    float s = 0.0f;
    for (long long i = blockIdx.x * (long long)NT + threadIdx.x; i < n; i += (long long)gridDim.x * NT) {
        float v = load(x, i);
        s += v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[slot] = Σ_k partial[k]   (single block)
extern "C" __global__ void sum_squares_finish(float* out, int slot, const float* __restrict__ partial, int count) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < count; i += NT) s += partial[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[slot] = s;
}

// s = hyper[9] (loss scale); norm = √(Σ parts) / s; hyper[7] = norm; hyper[10] = norm inf/NaN ? 1 : 0;
// hyper[6] = (max_norm > 0 && norm > max_norm ? max_norm/norm : 1) / s  (single block)
extern "C" __global__ void clip_scale(float* hyper, const float* __restrict__ parts, int count, float max_norm) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < count; i += NT) s += parts[i];
    s = block_sum(s);
    if (threadIdx.x == 0) {
        float ls = hyper[9];  // the loss scale the gradients carry
        float norm = sqrtf(s) / ls;
        hyper[7] = norm;
        hyper[10] = isfinite(norm) ? 0.0f : 1.0f;
        hyper[6] = ((max_norm > 0.0f && norm > max_norm) ? max_norm / norm : 1.0f) / ls;
    }
}
