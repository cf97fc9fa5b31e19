// reduce.wgsl — zeroing, sums of squares (the gradient norm) and the clip scale.
// zero:            out[i] = 0   (i < n)
// sumsq_partial:   part[part0 + g] = Σ_{i ≡ this workgroup's stride set} inp[i]²   (g = workgroup, fixed grid → deterministic)
// sumsq_finalize:  out[slot] = Σ_{j < nparts} part[j]
// clip_scale:      s = hyper[9] (loss scale); norm = √(Σ_{j < nparts} parts[j]) / s; hyper[7] = norm;
//                  hyper[10] = 1 if norm is inf/NaN else 0; hyper[6] = (max_norm/norm if 0 < max_norm < norm else 1) / s

struct P {
    n: u32,
    o_out: u32,
    o_inp: u32,
    part0: u32,
    nparts: u32,
    slot: u32,
    o_hyper: u32,
    max_norm: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> inp: array<f32>;
@group(0) @binding(3) var<storage, read_write> part_w: array<f32>;
@group(0) @binding(4) var<storage, read> part_r: array<f32>;
@group(0) @binding(5) var<storage, read_write> hyper: array<f32>;

//#include block_reduce f32

@compute @workgroup_size(256)
fn zero(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    for (var i = gid.x; i < p.n; i += stride) {
        dst[p.o_out + i] = 0.0;
    }
}

@compute @workgroup_size(256)
fn sumsq_partial(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let stride = nwg.x * 256u;
    var acc = 0.0;
    for (var i = gid.x; i < p.n; i += stride) {
        let x = inp[p.o_inp + i];
        acc += x * x;
    }
    let s = block_sum(acc, lid);
    if (lid == 0u) {
        part_w[p.part0 + wid.x] = s;
    }
}

@compute @workgroup_size(256)
fn sumsq_finalize(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var j = lid; j < p.nparts; j += 256u) {
        acc += part_r[p.part0 + j];
    }
    let s = block_sum(acc, lid);
    if (lid == 0u) {
        dst[p.o_out + p.slot] = s;
    }
}

@compute @workgroup_size(1)
fn clip_scale() {
    var sum = 0.0;
    for (var j = 0u; j < p.nparts; j++) {
        sum += part_r[p.part0 + j];
    }
    let s = hyper[p.o_hyper + 9u];
    let norm = sqrt(sum) / s;
    hyper[p.o_hyper + 7u] = norm;
    // inf/NaN by the bits (WGSL lets a compiler assume finite floats in comparisons)
    let nonfinite = (bitcast<u32>(norm) & 0x7f800000u) == 0x7f800000u;
    hyper[p.o_hyper + 10u] = select(0.0, 1.0, nonfinite);
    var scale = 1.0;
    if (p.max_norm > 0.0 && norm > p.max_norm) {
        scale = p.max_norm / norm;
    }
    hyper[p.o_hyper + 6u] = scale / s;
}
