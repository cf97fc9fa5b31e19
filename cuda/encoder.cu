// encoder.cu: token + position embeddings (floatX tables and activations, f32 sums; the cached
// encoder also reads f16 embeddings). Launch: 1-D grid-stride loops, any block size.

// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]   (a token outside [0, vocab) gives NaN)
extern "C" __global__ void encoder_forward(floatX* __restrict__ out, const int* __restrict__ tokens,
                                           const floatX* __restrict__ wte, const floatX* __restrict__ wpe,
                                           int BT, int T, int C, int vocab) {
    long long total = (long long)BT * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int bt = (int)(i / C);
        int c = (int)(i - (long long)bt * C);
        int t = bt % T;
        int tok = tokens[bt];
        float e = (tok >= 0 && tok < vocab) ? load(wte, (long long)tok * C + c) : __int_as_float(0x7fc00000);
        store(out, i, e + load(wpe, (long long)t * C + c));
    }
}

// dwpe[t,c] += Σ_b dout[b,t,c]   (one thread per (t,c), summed over b in order: deterministic)
extern "C" __global__ void encoder_backward_wpe(floatX* __restrict__ dwpe, const floatX* __restrict__ dout,
                                                int B, int T, int C) {
    long long total = (long long)T * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int b = 0; b < B; b++) s += load(dout, (long long)b * total + i);
        store(dwpe, i, load(dwpe, i) + s);
    }
}

// f32 only: dwte[tokens[b,t],c] += dout[b,t,c]   (atomics: rows of repeated tokens add up in any order)
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

// The same sum without atomics (every precision; a 16-bit atomic would round each addition), in
// two launches. First the rows of each token as a chain: next[bt] = the next row with the same
// token (−1: none), head[bt] = 1 if no earlier row has it (links = [next | head], 2·BT ints).
extern "C" __global__ void encoder_backward_wte_links(int* __restrict__ links, const int* __restrict__ tokens, int BT) {
    for (int bt = blockIdx.x * blockDim.x + threadIdx.x; bt < BT; bt += gridDim.x * blockDim.x) {
        int tok = tokens[bt], next = -1, head = 1;
        for (int j = 0; j < BT && (head || next < 0); j++) {
            if (tokens[j] != tok || j == bt) continue;
            if (j < bt) head = 0;
            else if (next < 0) next = j;
        }
        links[bt] = next;
        links[BT + bt] = head;
    }
}

// dwte[tok,c] += Σ_{rows bt of tok, in order} dout[bt,c]: the head row's thread walks the chain,
// summing in f32 onto the stored value, and stores once (the cpu reference's order and rounding).
extern "C" __global__ void encoder_backward_wte_chain(floatX* __restrict__ dwte, const floatX* __restrict__ dout,
                                                      const int* __restrict__ tokens, const int* __restrict__ links,
                                                      int BT, int C, int vocab) {
    long long total = (long long)BT * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int bt = (int)(i / C);
        int c = (int)(i - (long long)bt * C);
        int tok = tokens[bt];
        if (!links[BT + bt] || tok < 0 || tok >= vocab) continue;
        long long k = (long long)tok * C + c;
        float s = load(dwte, k);
        for (int j = bt; j >= 0; j = links[j]) s += load(dout, (long long)j * C + c);
        store(dwte, k, s);
    }
}

// Cached decoding: out[r,:] = wte[tokens[r],:] + wpe[pos[r],:]   (rows need not be contiguous in
// time; a token outside [0, vocab) or a position outside [0, npos) gives NaN). TE/TP: the element
// types of wte/wpe, floatX or half_t (f16 weights), converted to f32 before the sum.
template <class TE, class TP>
__device__ __forceinline__ void encoder_at_rows(floatX* __restrict__ out, const int* __restrict__ tokens,
                                                const int* __restrict__ pos, const TE* __restrict__ wte,
                                                const TP* __restrict__ wpe, int N, int C, int vocab, int npos) {
    long long total = (long long)N * C;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int r = (int)(i / C);
        int c = (int)(i - (long long)r * C);
        int tok = tokens[r], p = pos[r];
        bool ok = tok >= 0 && tok < vocab && p >= 0 && p < npos;
        store(out, i, ok ? load(wte, (long long)tok * C + c) + load(wpe, (long long)p * C + c)
                         : __int_as_float(0x7fc00000));
    }
}

// The four (wte, wpe) type pairs: floatX floatX, f16 f16 (f16 inference), and the mixed two
extern "C" __global__ void encoder_at(floatX* __restrict__ out, const int* __restrict__ tokens,
                                      const int* __restrict__ pos, const floatX* __restrict__ wte,
                                      const floatX* __restrict__ wpe, int N, int C, int vocab, int npos) {
    encoder_at_rows(out, tokens, pos, wte, wpe, N, C, vocab, npos);
}
extern "C" __global__ void encoder_at_f16(floatX* __restrict__ out, const int* __restrict__ tokens,
                                          const int* __restrict__ pos, const half_t* __restrict__ wte,
                                          const half_t* __restrict__ wpe, int N, int C, int vocab, int npos) {
    encoder_at_rows(out, tokens, pos, wte, wpe, N, C, vocab, npos);
}
extern "C" __global__ void encoder_at_f16_wte(floatX* __restrict__ out, const int* __restrict__ tokens,
                                              const int* __restrict__ pos, const half_t* __restrict__ wte,
                                              const floatX* __restrict__ wpe, int N, int C, int vocab, int npos) {
    encoder_at_rows(out, tokens, pos, wte, wpe, N, C, vocab, npos);
}
extern "C" __global__ void encoder_at_f16_wpe(floatX* __restrict__ out, const int* __restrict__ tokens,
                                              const int* __restrict__ pos, const floatX* __restrict__ wte,
                                              const half_t* __restrict__ wpe, int N, int C, int vocab,
                                              int npos) {
    encoder_at_rows(out, tokens, pos, wte, wpe, N, C, vocab, npos);
}
