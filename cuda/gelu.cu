// gelu.cu: tanh-approximation GELU (floatX storage, f32 arithmetic). 1-D grid-stride loops.

#define GELU_K 0.7978845608028654f  // √(2/π)
#define GELU_A 0.044715f

// out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float x = load(inp, i);
        float u = GELU_K * (x + GELU_A * x * x * x);
        store(out, i, 0.5f * x * (1.0f + tanhf(u)));
    }
}

// dinp = dout·gelu'(x),  gelu'(x) = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh² u)·√(2/π)·(1 + 3·0.044715·x²)
extern "C" __global__ void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float x = load(inp, i);
        float u = GELU_K * (x + GELU_A * x * x * x);
        float th = tanhf(u);
        float local = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_K * (1.0f + 3.0f * GELU_A * x * x);
        store(dinp, i, local * load(dout, i));
    }
}
