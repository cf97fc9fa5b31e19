// residual.wgsl — elementwise sum of two views.
// residual_forward: out[i] = a[i] + b[i]   (i < n)

struct P {
    n: u32,
    o_out: u32,
    o_a: u32,
    o_b: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> src_a: array<f32>;
@group(0) @binding(3) var<storage, read> src_b: array<f32>;

@compute @workgroup_size(256)
fn residual_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    for (var i = gid.x; i < p.n; i += stride) {
        dst[p.o_out + i] = src_a[p.o_a + i] + src_b[p.o_b + i];
    }
}
