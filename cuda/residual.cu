// residual.cu: elementwise sum (fp32). 1-D grid-stride loop; out may alias a or b.

// out = a + b
extern "C" __global__ void residual_forward(float* out, const float* a, const float* b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = a[i] + b[i];
    }
}
