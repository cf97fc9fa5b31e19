// classifier.cu: softmax cross-entropy over the first V of Vp logits per row (floatX logits, f32 arithmetic and losses).
// One block per row, blockDim.x a multiple of 32 (≤ 1024). Online (max, Σexp) per thread, merged
// across the block; then, if write_grad, the logits row is overwritten with its gradient.

#define NEG_INF __int_as_float(0xff800000)

// merge two (max, Σ exp(x − max)) pairs
__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == NEG_INF) {
        m = mm;
        s = 0.0f;
        return;
    }
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// loss_r = logsumexp(logits[r,:V]) − logits[r,target], written to losses[r] or, if accumulate, added
// to it;  if write_grad: logits[r,i] =
// (softmax(logits[r,:V])_i − [i == target])·dloss for i < V, 0 for V ≤ i < Vp, with dloss = *seed (the
// loss-gradient seed slot of the device scalars, read only if write_grad). Targets are valid (checked at upload).
extern "C" __global__ void crossentropy_forward_backward(floatX* logits, float* __restrict__ losses,
                                                         const int* __restrict__ targets,
                                                         const float* __restrict__ seed, int N, int V, int Vp,
                                                         int write_grad, int accumulate) {
    __shared__ float sm[32], ss[32];
    __shared__ float s_lse, s_xt;
    int row = blockIdx.x;
    if (row >= N) return;
    floatX* x = logits + (long long)row * Vp;
    int tgt = targets[row];
    bool valid = tgt >= 0 && tgt < V;
    if (threadIdx.x == 0) s_xt = valid ? load(x, tgt) : 0.0f;

    float m = NEG_INF, s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float v = load(x, i);
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ms_merge(m, s, m2, s2);
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sm[lane] : NEG_INF;
        s = lane < nw ? ss[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            float s2 = __shfl_xor_sync(0xffffffffu, s, o);
            ms_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            float lse = m + logf(s);
            s_lse = lse;
            float l = valid ? lse - s_xt : __int_as_float(0x7fc00000);
            losses[row] = accumulate ? losses[row] + l : l;
        }
    }
    __syncthreads();
    if (!write_grad) return;
    float lse = s_lse;
    float dloss = *seed;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float g = 0.0f;
        if (i < V) g = (expf(load(x, i) - lse) - (i == tgt ? 1.0f : 0.0f)) * dloss;
        store(x, i, g);
    }
}
