// gelu.wgsl — GELU, tanh approximation (GPT-2's), elementwise over n values.
// gelu_forward:  out[i] = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))),  x = inp[i]
// gelu_backward: dinp[i] = dout[i]·(0.5·(1 + tanh u) + 0.5·x·(1 − tanh²u)·√(2/π)·(1 + 3·0.044715·x²)),  u as above
//
// Element offsets (o_*) locate each view inside its bound range; the host binds 256-byte-aligned
// ranges. Grid-stride loops: any n with at most 65535 workgroups of 256.

struct P {
    n: u32,
    o_out: u32,
    o_inp: u32,
    o_dout: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> inp: array<f32>;
@group(0) @binding(3) var<storage, read> dout: array<f32>;

const GELU_SCALE: f32 = 0.7978845608028654; // √(2/π)

// tanh via exp(−2|u|): never overflows (some back ends' tanh returns NaN for large |u|)
fn tanh_safe(u: f32) -> f32 {
    let e = exp(-2.0 * abs(u));
    let t = (1.0 - e) / (1.0 + e);
    return select(t, -t, u < 0.0);
}

@compute @workgroup_size(256)
fn gelu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    for (var i = gid.x; i < p.n; i += stride) {
        let x = inp[p.o_inp + i];
        let u = GELU_SCALE * (x + 0.044715 * x * x * x);
        dst[p.o_out + i] = 0.5 * x * (1.0 + tanh_safe(u));
    }
}

@compute @workgroup_size(256)
fn gelu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    for (var i = gid.x; i < p.n; i += stride) {
        let x = inp[p.o_inp + i];
        let x2 = x * x;
        let th = tanh_safe(GELU_SCALE * (x + 0.044715 * x2 * x));
        let du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * x2);
        dst[p.o_out + i] = dout[p.o_dout + i] * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du);
    }
}
