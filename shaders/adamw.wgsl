// adamw.wgsl — AdamW with decoupled weight decay; per-step scalars come from the `hyper` buffer
// (slots: 0 lr, 1 β1, 2 β2, 3 eps, 4 bc1 = 1−β1^t, 5 bc2 = 1−β2^t, 6 grad scale, 7 grad norm,
// 10 found inf).
// adamw: nothing when hyper[10] ≠ 0 (a skipped step); else g = grad·hyper[6]; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; param −= lr·((m/bc1)/(√(v/bc2) + eps) + wd·param)

struct P {
    n: u32,
    o_param: u32,
    o_grad: u32,
    o_m: u32,
    o_v: u32,
    o_hyper: u32,
    weight_decay: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> mom1: array<f32>;
@group(0) @binding(4) var<storage, read_write> mom2: array<f32>;
@group(0) @binding(5) var<storage, read> hyper: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let lr = hyper[p.o_hyper + 0u];
    let b1 = hyper[p.o_hyper + 1u];
    let b2 = hyper[p.o_hyper + 2u];
    let eps = hyper[p.o_hyper + 3u];
    let bc1 = hyper[p.o_hyper + 4u];
    let bc2 = hyper[p.o_hyper + 5u];
    let gs = hyper[p.o_hyper + 6u];
    if (hyper[p.o_hyper + 10u] != 0.0) {
        return;
    }
    let stride = nwg.x * 256u;
    for (var i = gid.x; i < p.n; i += stride) {
        let g = grad[p.o_grad + i] * gs;
        let m = b1 * mom1[p.o_m + i] + (1.0 - b1) * g;
        let v = b2 * mom2[p.o_v + i] + (1.0 - b2) * g * g;
        mom1[p.o_m + i] = m;
        mom2[p.o_v + i] = v;
        let w = param[p.o_param + i];
        param[p.o_param + i] = w - lr * ((m / bc1) / (sqrt(v / bc2) + eps) + p.weight_decay * w);
    }
}
