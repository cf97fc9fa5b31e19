// encoder.cu: token + position embeddings (f32; the cached encoder also reads f16 embeddings).
// Self-contained; compiled by NVRTC.
// Launch: 1-D grid-stride loops, any block size.

// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]   (a token outside [0, vocab) gives NaN)
extern "C" __global__ void encoder_forward(float* __restrict__ out, const int* __restrict__ tokens,
                                           const float* __restrict__ wte, const float* __restrict__ wpe,
                                           int BT, int T, int C, int vocab) {
    long long total = (long long)BT * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int bt = (int)(i / C);
        int c = (int)(i - (long long)bt * C);
        int t = bt % T;
        int tok = tokens[bt];
        float e = (tok >= 0 && tok < vocab) ? wte[(long long)tok * C + c] : __int_as_float(0x7fc00000);
        out[i] = e + wpe[(long long)t * C + c];
    }
}

// dwpe[t,c] += Σ_b dout[b,t,c]   (one thread per (t,c), summed over b in order: deterministic)
extern "C" __global__ void encoder_backward_wpe(float* __restrict__ dwpe, const float* __restrict__ dout,
                                                int B, int T, int C) {
    long long total = (long long)T * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int b = 0; b < B; b++) s += dout[(long long)b * total + i];
        dwpe[i] += s;
    }
}

// dwte[tokens[b,t],c] += dout[b,t,c]   (atomics: rows of repeated tokens add up in any order)
extern "C" __global__ void encoder_backward_wte(float* __restrict__ dwte, const float* __restrict__ dout,
                                                const int* __restrict__ tokens, int BT, int C, int vocab) {
    long long total = (long long)BT * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int bt = (int)(i / C);
        int c = (int)(i - (long long)bt * C);
        int tok = tokens[bt];
        if (tok >= 0 && tok < vocab) atomicAdd(&dwte[(long long)tok * C + c], dout[i]);
    }
}

// An f16 (IEEE binary16) weight, stored as its 16 bits, to f32: exact for every value (normals,
// subnormals, ±0, ±inf, NaN); the same function as in matmul.cu (each file is compiled alone).
// Plain arithmetic, no header or PTX, so the GPU and the CUDA emulator run the same code.
__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
    unsigned int bits = (unsigned int)(h & 0x7fffu) << 13;
    float mag = __int_as_float((int)bits) * 0x1p112f;  // rebias 15 → 127 (subnormals become normal)
    if ((h & 0x7c00u) == 0x7c00u) mag = __int_as_float((int)(bits | 0x7f800000u));  // inf / NaN
    return __int_as_float(__float_as_int(mag) | (int)((unsigned int)(h & 0x8000u) << 16));
}
__device__ __forceinline__ float load_f32(const float* __restrict__ p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f32(const unsigned short* __restrict__ p, long long i) {
    return f16_bits_to_f32(p[i]);
}

// Cached decoding: out[r,:] = wte[tokens[r],:] + wpe[pos[r],:]   (rows need not be contiguous in
// time; a token outside [0, vocab) or a position outside [0, npos) gives NaN). TE/TP: the element
// types of wte/wpe, float or unsigned short (f16 bits, converted to f32 before the sum).
template <class TE, class TP>
__device__ __forceinline__ void encoder_at_rows(float* __restrict__ out, const int* __restrict__ tokens,
                                                const int* __restrict__ pos, const TE* __restrict__ wte,
                                                const TP* __restrict__ wpe, int N, int C, int vocab, int npos) {
    long long total = (long long)N * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int r = (int)(i / C);
        int c = (int)(i - (long long)r * C);
        int tok = tokens[r], p = pos[r];
        bool ok = tok >= 0 && tok < vocab && p >= 0 && p < npos;
        out[i] = ok ? load_f32(wte, (long long)tok * C + c) + load_f32(wpe, (long long)p * C + c)
                    : __int_as_float(0x7fc00000);
    }
}

// The four (wte, wpe) dtype pairs: f32 f32, f16 f16 (f16 inference), and the mixed two
extern "C" __global__ void encoder_at(float* __restrict__ out, const int* __restrict__ tokens,
                                      const int* __restrict__ pos, const float* __restrict__ wte,
                                      const float* __restrict__ wpe, int N, int C, int vocab, int npos) {
    encoder_at_rows(out, tokens, pos, wte, wpe, N, C, vocab, npos);
}
extern "C" __global__ void encoder_at_f16(float* __restrict__ out, const int* __restrict__ tokens,
                                          const int* __restrict__ pos, const unsigned short* __restrict__ wte,
                                          const unsigned short* __restrict__ wpe, int N, int C, int vocab, int npos) {
    encoder_at_rows(out, tokens, pos, wte, wpe, N, C, vocab, npos);
}
extern "C" __global__ void encoder_at_f16_wte(float* __restrict__ out, const int* __restrict__ tokens,
                                              const int* __restrict__ pos, const unsigned short* __restrict__ wte,
                                              const float* __restrict__ wpe, int N, int C, int vocab, int npos) {
    encoder_at_rows(out, tokens, pos, wte, wpe, N, C, vocab, npos);
}
extern "C" __global__ void encoder_at_f16_wpe(float* __restrict__ out, const int* __restrict__ tokens,
                                              const int* __restrict__ pos, const float* __restrict__ wte,
                                              const unsigned short* __restrict__ wpe, int N, int C, int vocab,
                                              int npos) {
    encoder_at_rows(out, tokens, pos, wte, wpe, N, C, vocab, npos);
}
