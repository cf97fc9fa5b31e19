// adamw.cu: AdamW update reading the per-step scalars from the device `hyper` buffer.
// hyper slots (src/graph/kernels.rs `Scalars`): 0 lr, 1 β1, 2 β2, 3 eps, 4 bc1 = 1−β1^t, 5 bc2 = 1−β2^t,
// 6 grad scale (clipping, loss scale), 7 grad norm, 10 found inf.
// param and grad are floatX (common.cuh); master (f32 master weights of a low-precision graph, or
// null), m and v are f32.

// nothing when hyper[10] ≠ 0 (a skipped step); else g = grad·scale; m = β1·m + (1−β1)·g;
// v = β2·v + (1−β2)·g²; w −= lr·((m/bc1)/(√(v/bc2) + eps) + wd·w), w = master if given else param;
// param = w (rounded to floatX), master = w
extern "C" __global__ void adamw_update(floatX* param, float* master, const floatX* __restrict__ grad, float* m,
                                        float* v, const float* __restrict__ hyper, long long n, float weight_decay) {
    float lr = hyper[0], b1 = hyper[1], b2 = hyper[2], eps = hyper[3];
    float bc1 = hyper[4], bc2 = hyper[5], scale = hyper[6];
    if (hyper[10] != 0.0f) return;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = load(grad, i) * scale;
        float mi = b1 * m[i] + (1.0f - b1) * g;
        float vi = b2 * v[i] + (1.0f - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1;
        float vhat = vi / bc2;
        float p = master ? master[i] : load(param, i);
        float np = p - lr * (mhat / (sqrtf(vhat) + eps) + weight_decay * p);
        if (master) master[i] = np;
        store(param, i, np);
    }
}
