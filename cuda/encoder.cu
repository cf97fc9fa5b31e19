// encoder.cu: token + position embeddings (fp32). Self-contained; compiled by NVRTC.
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
