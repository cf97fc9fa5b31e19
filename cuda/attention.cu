// attention.cu: causal multi-head self-attention, flash style: no (T,T) matrix is stored.
// qkv, out and their gradients and the caches are floatX (common.cuh); lse, D, shared tiles and
// all arithmetic are f32.
// qkv is (B, T, 3C) = [q | k | v]; head h uses features [h·hs, (h+1)·hs), hs = C/NH ≤ 128.
// The training kernels (the cached decoding ones are described at the end): block of 256 threads
// = 8 warps; a block owns 32 rows (4 per warp) of one (b, h) and streams tiles of 32 rows of the
// other operand through shared memory (padded rows, no bank conflicts). Lanes index the streamed
// rows for dot products and the feature dimension (lane + 32·k, k < 4) for accumulations.
// Grid: (⌈T/32⌉, B·NH). Dynamic shared memory: (2·32·hs + 2·32·(hs+1)) floats for the backward
// kernels, (32·hs + 2·32·(hs+1)) for the forward.

#define TILE 32
#define RPW 4   // rows per warp
#define NDL 4   // feature dims per lane: hs ≤ 32·NDL
#define FULL 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

// Copy rows [r0, r0+TILE) of one head's slice (feature offset `feat`) of a (B·T, stride) tensor into
// dst[TILE][ld]; rows ≥ T are zero.
__device__ __forceinline__ void load_tile(float* dst, int ld, const floatX* src, long long stride, int feat,
                                          int r0, int T, int hs) {
    for (int e = threadIdx.x; e < TILE * hs; e += blockDim.x) {
        int r = e / hs, d = e - r * hs;
        int t = r0 + r;
        dst[r * ld + d] = t < T ? load(src, (long long)t * stride + feat + d) : 0.0f;
    }
}

// Two dot products per own row r (rows rb..rb+RPW of two [TILE][ld] tiles) and this lane's streamed
// row (row `lane` of two [TILE][hsp] tiles): a[r] = own_a[r]·str_a[lane], b[r] = own_b[r]·str_b[lane].
__device__ __forceinline__ void own_dot_streamed2(float (&a)[RPW], float (&b)[RPW], const float* own_a,
                                                  const float* own_b, int ld, const float* str_a,
                                                  const float* str_b, int hsp, int rb, int lane, int hs) {
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        a[r] = 0.0f;
        b[r] = 0.0f;
    }
    for (int d = 0; d < hs; d++) {
        float sa = str_a[lane * hsp + d];
        float sb = str_b[lane * hsp + d];
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            a[r] += own_a[(rb + r) * ld + d] * sa;
            b[r] += own_b[(rb + r) * ld + d] * sb;
        }
    }
}

// This lane's features (lane + 32·k, k < NDL; 0 past hs) of row j of a [TILE][hsp] tile.
__device__ __forceinline__ void lane_features(float (&f)[NDL], const float* tile, int j, int hsp, int lane, int hs) {
#pragma unroll
    for (int k = 0; k < NDL; k++) {
        int d = lane + 32 * k;
        f[k] = d < hs ? tile[j * hsp + d] : 0.0f;
    }
}

// acc[r] += Σ_j w_j[r]·tile[j] over the TILE streamed rows, where lane j holds w_j[r] = w[r] (the
// weights travel by shuffle) and each lane accumulates its own features.
__device__ __forceinline__ void accumulate_rows(float (&acc)[RPW][NDL], const float (&w)[RPW], const float* tile,
                                                int hsp, int lane, int hs) {
    for (int j = 0; j < TILE; j++) {
        float f[NDL];
        lane_features(f, tile, j, hsp, lane, hs);
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            float wj = __shfl_sync(FULL, w[r], j);
#pragma unroll
            for (int k = 0; k < NDL; k++) acc[r][k] += wj * f[k];
        }
    }
}

// row[d] = acc[k]·mul for this lane's features d = lane + 32·k < hs.
__device__ __forceinline__ void store_features(floatX* row, const float (&acc)[NDL], float mul, int lane, int hs) {
#pragma unroll
    for (int k = 0; k < NDL; k++) {
        int d = lane + 32 * k;
        if (d < hs) store(row, d, acc[k] * mul);
    }
}

// s[u] = q_t·k_u/√hs (u ≤ t), p = softmax(s), out[b,t,h·hs..] = Σ_u p[u]·v_u;
// lse[b,h,t] = max + ln Σ exp(s − max)
extern "C" __global__ void __launch_bounds__(256, 2) attention_forward(floatX* __restrict__ out, float* __restrict__ lse,
                                                                    const floatX* __restrict__ qkv, int B, int T,
                                                                    int C, int NH) {
    extern __shared__ float smem[];
    int hs = C / NH, hsp = hs + 1;
    float* Qs = smem;              // [TILE][hs]   own query rows
    float* Ks = Qs + TILE * hs;    // [TILE][hsp]  streamed keys
    float* Vs = Ks + TILE * hsp;   // [TILE][hsp]  streamed values
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int q0 = blockIdx.x * TILE;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int rb = warp * RPW;
    float scale = 1.0f / sqrtf((float)hs);
    long long stride = 3LL * C;
    const floatX* base = qkv + (long long)b * T * stride;

    load_tile(Qs, hs, base, stride, h * hs, q0, T, hs);

    float m[RPW], l[RPW], o[RPW][NDL];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int k = 0; k < NDL; k++) o[r][k] = 0.0f;
    }
    int tlast = min(q0 + TILE, T) - 1;
    for (int k0 = 0; k0 <= tlast; k0 += TILE) {
        __syncthreads();
        load_tile(Ks, hsp, base, stride, C + h * hs, k0, T, hs);
        load_tile(Vs, hsp, base, stride, 2 * C + h * hs, k0, T, hs);
        __syncthreads();
        float s[RPW];
#pragma unroll
        for (int r = 0; r < RPW; r++) s[r] = 0.0f;
        for (int d = 0; d < hs; d++) {
            float kv = Ks[lane * hsp + d];
#pragma unroll
            for (int r = 0; r < RPW; r++) s[r] += Qs[(rb + r) * hs + d] * kv;
        }
        int u = k0 + lane;
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            int t = q0 + rb + r;
            bool valid = t < T && u <= t;
            float sv = valid ? s[r] * scale : NEG_INF;
            float mnew = fmaxf(m[r], warp_max(sv));
            if (mnew == NEG_INF) {  // warp-uniform: nothing visible to this row in this tile
                s[r] = 0.0f;
                continue;
            }
            float p = valid ? expf(sv - mnew) : 0.0f;
            float corr = expf(m[r] - mnew);
            l[r] = l[r] * corr + warp_sum(p);
#pragma unroll
            for (int k = 0; k < NDL; k++) o[r][k] *= corr;
            m[r] = mnew;
            s[r] = p;
        }
        accumulate_rows(o, s, Vs, hsp, lane, hs);  // o += p·v
    }
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        int t = q0 + rb + r;
        if (t >= T) continue;
        store_features(out + ((long long)b * T + t) * C + h * hs, o[r], 1.0f / l[r], lane, hs);
        if (lane == 0) lse[((long long)b * NH + h) * T + t] = m[r] + logf(l[r]);
    }
}

// Backward, part 1 (per query row t): p = exp(s − lse), dP = dout·vᵀ, D_t = Σ dout_t·out_t,
// dS = p∘(dP − D): dq_t = Σ_u dS[u]·k_u/√hs, written to dqkv[b,t,h·hs..]; D_t saved to Dbuf[b,h,t].
extern "C" __global__ void __launch_bounds__(256, 2) attention_backward_dq(floatX* __restrict__ dqkv, float* __restrict__ Dbuf,
                                                                       const floatX* __restrict__ dout,
                                                                       const floatX* __restrict__ out,
                                                                       const float* __restrict__ lse,
                                                                       const floatX* __restrict__ qkv, int B, int T,
                                                                       int C, int NH) {
    extern __shared__ float smem[];
    int hs = C / NH, hsp = hs + 1;
    float* Qs = smem;               // [TILE][hs]   own query rows
    float* Os = Qs + TILE * hs;     // [TILE][hs]   own dout rows
    float* Ks = Os + TILE * hs;     // [TILE][hsp]  streamed keys
    float* Vs = Ks + TILE * hsp;    // [TILE][hsp]  streamed values
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int q0 = blockIdx.x * TILE;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int rb = warp * RPW;
    float scale = 1.0f / sqrtf((float)hs);
    long long stride = 3LL * C;
    const floatX* base = qkv + (long long)b * T * stride;
    const floatX* dbase = dout + (long long)b * T * C;
    const floatX* obase = out + (long long)b * T * C;
    long long lbase = ((long long)b * NH + h) * T;

    load_tile(Qs, hs, base, stride, h * hs, q0, T, hs);
    load_tile(Os, hs, dbase, C, h * hs, q0, T, hs);

    float D[RPW], L[RPW], dq[RPW][NDL];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        int t = q0 + rb + r;
        float acc = 0.0f;
        if (t < T) {
#pragma unroll
            for (int k = 0; k < NDL; k++) {
                int d = lane + 32 * k;
                if (d < hs) acc += load(dbase, (long long)t * C + h * hs + d) * load(obase, (long long)t * C + h * hs + d);
            }
        }
        D[r] = warp_sum(acc);
        L[r] = t < T ? lse[lbase + t] : 0.0f;
        if (lane == 0 && t < T) Dbuf[lbase + t] = D[r];
#pragma unroll
        for (int k = 0; k < NDL; k++) dq[r][k] = 0.0f;
    }
    int tlast = min(q0 + TILE, T) - 1;
    for (int k0 = 0; k0 <= tlast; k0 += TILE) {
        __syncthreads();
        load_tile(Ks, hsp, base, stride, C + h * hs, k0, T, hs);
        load_tile(Vs, hsp, base, stride, 2 * C + h * hs, k0, T, hs);
        __syncthreads();
        float s[RPW], dp[RPW];  // s = q_t·k_u, dp = dout_t·v_u
        own_dot_streamed2(s, dp, Qs, Os, hs, Ks, Vs, hsp, rb, lane, hs);
        int u = k0 + lane;
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            int t = q0 + rb + r;
            bool valid = t < T && u <= t;
            float p = valid ? expf(s[r] * scale - L[r]) : 0.0f;
            s[r] = p * (dp[r] - D[r]);  // dS
        }
        accumulate_rows(dq, s, Ks, hsp, lane, hs);  // dq += dS·k
    }
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        int t = q0 + rb + r;
        if (t >= T) continue;
        store_features(dqkv + ((long long)b * T + t) * stride + h * hs, dq[r], scale, lane, hs);
    }
}

// Backward, part 2 (per key row u, run after part 1): over queries t ≥ u, p = exp(s − lse),
// dS = p∘(dout_t·v_u − D_t): dk_u = Σ_t dS·q_t/√hs, dv_u = Σ_t p·dout_t; written to dqkv[b,u,C+h·hs..]
// and dqkv[b,u,2C+h·hs..].
extern "C" __global__ void __launch_bounds__(256, 2) attention_backward_dkv(floatX* __restrict__ dqkv,
                                                                        const float* __restrict__ Dbuf,
                                                                        const floatX* __restrict__ dout,
                                                                        const float* __restrict__ lse,
                                                                        const floatX* __restrict__ qkv, int B, int T,
                                                                        int C, int NH) {
    extern __shared__ float smem[];
    __shared__ float Ls[TILE], Ds[TILE];
    int hs = C / NH, hsp = hs + 1;
    float* Ks = smem;               // [TILE][hs]   own key rows
    float* Vs = Ks + TILE * hs;     // [TILE][hs]   own value rows
    float* Qs = Vs + TILE * hs;     // [TILE][hsp]  streamed queries
    float* Os = Qs + TILE * hsp;    // [TILE][hsp]  streamed dout rows
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int u0 = blockIdx.x * TILE;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int rb = warp * RPW;
    float scale = 1.0f / sqrtf((float)hs);
    long long stride = 3LL * C;
    const floatX* base = qkv + (long long)b * T * stride;
    const floatX* dbase = dout + (long long)b * T * C;
    long long lbase = ((long long)b * NH + h) * T;

    load_tile(Ks, hs, base, stride, C + h * hs, u0, T, hs);
    load_tile(Vs, hs, base, stride, 2 * C + h * hs, u0, T, hs);

    float dk[RPW][NDL], dv[RPW][NDL];
#pragma unroll
    for (int r = 0; r < RPW; r++)
#pragma unroll
        for (int k = 0; k < NDL; k++) {
            dk[r][k] = 0.0f;
            dv[r][k] = 0.0f;
        }
    for (int q0 = u0; q0 < T; q0 += TILE) {
        __syncthreads();
        load_tile(Qs, hsp, base, stride, h * hs, q0, T, hs);
        load_tile(Os, hsp, dbase, C, h * hs, q0, T, hs);
        if (threadIdx.x < TILE) {
            int t = q0 + threadIdx.x;
            Ls[threadIdx.x] = t < T ? lse[lbase + t] : 0.0f;
            Ds[threadIdx.x] = t < T ? Dbuf[lbase + t] : 0.0f;
        }
        __syncthreads();
        float s[RPW], dp[RPW];  // s = k_u·q_t, dp = v_u·dout_t
        own_dot_streamed2(s, dp, Ks, Vs, hs, Qs, Os, hsp, rb, lane, hs);
        int t = q0 + lane;
        float Lt = Ls[lane], Dt = Ds[lane];
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            int u = u0 + rb + r;
            bool valid = t < T && u <= t;
            float p = valid ? expf(s[r] * scale - Lt) : 0.0f;
            s[r] = p;                    // p
            dp[r] = p * (dp[r] - Dt);    // dS
        }
        accumulate_rows(dv, s, Os, hsp, lane, hs);   // dv += p·dout
        accumulate_rows(dk, dp, Qs, hsp, lane, hs);  // dk += dS·q
    }
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        int u = u0 + rb + r;
        if (u >= T) continue;
        floatX* row = dqkv + ((long long)b * T + u) * stride + h * hs;
        store_features(row + C, dk[r], scale, lane, hs);
        store_features(row + 2 * C, dv[r], 1.0f, lane, hs);
    }
}

// ---------------------------------------------------------------- cached (decoding) attention
// The caches are (nslots, tmax, C): row r of a launch belongs to the sequence in cache slot
// slots[r] at position pos[r] (i32). A slot or position out of range writes nothing (kv_store) or
// NaN (attention_cached); the graph checks ids at upload, so that is a guard, not a feature.

#define DEC_NT 256  // threads per block of attention_cached (8 warps), and its tile of cache positions

// kcache[slots[r], pos[r], :] = qkv[r, C..2C];  vcache[slots[r], pos[r], :] = qkv[r, 2C..3C].
// Launch: 1-D grid-stride loop over N·C, any block size.
extern "C" __global__ void kv_store(floatX* __restrict__ kcache, floatX* __restrict__ vcache,
                                    const floatX* __restrict__ qkv, const int* __restrict__ slots,
                                    const int* __restrict__ pos, int N, int C, int tmax, int nslots) {
    long long total = (long long)N * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int r = (int)(i / C);
        int d = (int)(i - (long long)r * C);
        int s = slots[r], p = pos[r];
        if (s < 0 || s >= nslots || p < 0 || p >= tmax) continue;
        long long dst = ((long long)s * tmax + p) * C + d;
        const floatX* row = qkv + (long long)r * 3 * C;
        kcache[dst] = row[C + d];
        vcache[dst] = row[2 * C + d];
    }
}

// max / Σ of v over the block (blockDim.x == DEC_NT), the same value in every thread (a fixed
// combination order). `buf` holds DEC_NT/32 floats; the leading barrier makes it reusable.
__device__ __forceinline__ float dec_block_max(float v, float* buf) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = buf[0];
#pragma unroll
    for (int w = 1; w < DEC_NT / 32; w++) r = fmaxf(r, buf[w]);
    return r;
}
__device__ __forceinline__ float dec_block_sum(float v, float* buf) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = buf[0];
#pragma unroll
    for (int w = 1; w < DEC_NT / 32; w++) r += buf[w];
    return r;
}

// Row r, head h (hs = C/NH ≤ 128), s = slots[r], p = pos[r]:
// sc[u] = q_r·kcache[s,u,h·hs..]/√hs for u ≤ p (q_r = qkv[r, h·hs..]),
// out[r, h·hs..] = Σ_u softmax(sc)[u]·vcache[s,u,h·hs..]. Reads cache rows 0..=p only.
// Launch: grid N·NH (block = r·NH + h), DEC_NT threads, no dynamic shared memory; 4 blocks per SM
// in the launch bounds (≤ 64 registers: plain __launch_bounds__(DEC_NT) made ptxas 12 spill on sm_80/90). The cache
// positions stream in tiles of DEC_NT with an online softmax (running max m and sum l): one
// thread per position for the scores, then threads over (group g, feature d) accumulate
// Σ p·v, group g taking the tile's positions j ≡ g (mod DEC_NT/hs); the groups add up at the end.
extern "C" __global__ void __launch_bounds__(DEC_NT, 4) attention_cached(floatX* __restrict__ out,
                                                                    const floatX* __restrict__ qkv,
                                                                    const floatX* __restrict__ kcache,
                                                                    const floatX* __restrict__ vcache,
                                                                    const int* __restrict__ slots,
                                                                    const int* __restrict__ pos, int N, int C,
                                                                    int NH, int tmax, int nslots) {
    __shared__ __align__(16) float qs[32 * NDL];  // the query's head slice
    __shared__ float ps[DEC_NT];       // this tile's unnormalised softmax weights
    __shared__ float part[DEC_NT];     // part[g·hs + d]: group g's share of out[d]
    __shared__ float red[DEC_NT / 32];
    int r = blockIdx.x / NH, h = blockIdx.x - r * NH;
    int hs = C / NH;
    int tid = threadIdx.x;
    int s = slots[r], p = pos[r];
    floatX* o = out + (long long)r * C + h * hs;
    if (s < 0 || s >= nslots || p < 0 || p >= tmax) {  // uniform over the block
        for (int d = tid; d < hs; d += DEC_NT) store(o, d, __int_as_float(0x7fc00000));
        return;
    }
    const floatX* q = qkv + (long long)r * 3 * C + h * hs;
    for (int d = tid; d < hs; d += DEC_NT) qs[d] = load(q, d);
    __syncthreads();

    long long base = (long long)s * tmax * C + h * hs;
    const floatX* kb = kcache + base;
    const floatX* vb = vcache + base;
    float scale = 1.0f / sqrtf((float)hs);
    int groups = DEC_NT / hs;
    int g = tid / hs, d = tid - g * hs;
    bool accum = g < groups;
    // f32 with every key row 16-byte aligned: float4 loads
    bool vec = FLOATX_IS_F32 && ((unsigned long long)kb & 15ULL) == 0 && (C & 3) == 0 && (hs & 3) == 0;

    float m = NEG_INF, l = 0.0f, acc = 0.0f;
    for (int u0 = 0; u0 <= p; u0 += DEC_NT) {
        int u = u0 + tid;
        float sc = NEG_INF;
        if (u <= p) {
            const floatX* k = kb + (long long)u * C;
            float dot = 0.0f;
            if (vec) {
                const float4* k4 = reinterpret_cast<const float4*>(k);
                const float4* q4 = reinterpret_cast<const float4*>(qs);
#pragma unroll 2
                for (int e = 0; e < (hs >> 2); e++) {
                    float4 kv = k4[e], qv = q4[e];
                    dot += qv.x * kv.x;
                    dot += qv.y * kv.y;
                    dot += qv.z * kv.z;
                    dot += qv.w * kv.w;
                }
            } else {
                for (int e = 0; e < hs; e++) dot += qs[e] * load(k, e);
            }
            sc = dot * scale;
        }
        // the tile holds u0 ≤ p, so its max (and mnew) is finite; corr is 0 on the first tile.
        // ps is safe to write: every thread has passed dec_block_max's barriers, so none still
        // reads the previous tile's weights
        float mnew = fmaxf(m, dec_block_max(sc, red));
        float e = u <= p ? expf(sc - mnew) : 0.0f;
        ps[tid] = e;
        float corr = expf(m - mnew);
        l = l * corr + dec_block_sum(e, red);  // its barriers also publish ps
        m = mnew;
        int cnt = min(DEC_NT, p - u0 + 1);
        if (accum) {
            float a = 0.0f;
            for (int j = g; j < cnt; j += groups) a += ps[j] * load(vb, (long long)(u0 + j) * C + d);
            acc = acc * corr + a;
        }
    }
    if (accum) part[tid] = acc;
    __syncthreads();
    if (tid < hs) {
        float t = 0.0f;
        for (int k = 0; k < groups; k++) t += part[k * hs + tid];
        store(o, tid, t / l);
    }
}
