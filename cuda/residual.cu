// residual.cu: elementwise sum (floatX storage, f32 sum). 1-D grid-stride loop; out may alias a or b.

// out = a + b
extern "C" __global__ void residual_forward(floatX* out, const floatX* a, const floatX* b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        store(out, i, load(a, i) + load(b, i));
    }
}
