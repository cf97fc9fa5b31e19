// layernorm.wgsl — LayerNorm over rows of c channels, eps 1e-5, biased variance. One workgroup per row
// for the row-wise passes; the parameter gradients are column sums done in row blocks (partials in a
// scratch buffer, then summed in order: deterministic, no atomics).
// ln_forward:      mean = Σx/c; rstd = 1/√(Σ(x−mean)²/c + 1e-5); out = (x − mean)·rstd·weight + bias  (writes out, mean, rstd)
// ln_backward_dinp: x̂ = (x−mean)·rstd, g = dout·weight; dinp = rstd·(g − mean(g) − x̂·mean(g·x̂))  (adds if accumulate, else writes)
// ln_backward_partials: part[2·rb·c + i] = Σ_{r ∈ block rb} dout[r,i]·x̂[r,i];  part[(2·rb+1)·c + i] = Σ_{r ∈ block rb} dout[r,i]
// ln_backward_finalize: dweight[i] += Σ_rb part[2·rb·c + i];  dbias[i] += Σ_rb part[(2·rb+1)·c + i]

struct P {
    n: u32,
    c: u32,
    o_out: u32,
    o_mean: u32,
    o_rstd: u32,
    o_inp: u32,
    o_w: u32,
    o_b: u32,
    o_dout: u32,
    accumulate: u32,
    rows_per_block: u32,
    nblocks: u32,
    o_dw: u32,
    o_db: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read_write> mean_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> rstd_w: array<f32>;
@group(0) @binding(4) var<storage, read> inp: array<f32>;
@group(0) @binding(5) var<storage, read> weight: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read> dout: array<f32>;
@group(0) @binding(8) var<storage, read> mean_r: array<f32>;
@group(0) @binding(9) var<storage, read> rstd_r: array<f32>;
@group(0) @binding(10) var<storage, read_write> part_w: array<f32>;
@group(0) @binding(11) var<storage, read> part_r: array<f32>;
@group(0) @binding(12) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(13) var<storage, read_write> dbias: array<f32>;

const WG: u32 = 256u;
//#include block_reduce vec2<f32>

@compute @workgroup_size(256)
fn ln_forward(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n) {
        return;
    }
    let x0 = p.o_inp + row * p.c;
    var s = 0.0;
    for (var i = lid; i < p.c; i += WG) {
        s += inp[x0 + i];
    }
    let m = block_sum(vec2<f32>(s, 0.0), lid).x / f32(p.c);
    var v = 0.0;
    for (var i = lid; i < p.c; i += WG) {
        let d = inp[x0 + i] - m;
        v += d * d;
    }
    let rs = 1.0 / sqrt(block_sum(vec2<f32>(v, 0.0), lid).x / f32(p.c) + 1e-5);
    let y0 = p.o_out + row * p.c;
    for (var i = lid; i < p.c; i += WG) {
        dst[y0 + i] = (inp[x0 + i] - m) * rs * weight[p.o_w + i] + bias[p.o_b + i];
    }
    if (lid == 0u) {
        mean_w[p.o_mean + row] = m;
        rstd_w[p.o_rstd + row] = rs;
    }
}

@compute @workgroup_size(256)
fn ln_backward_dinp(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n) {
        return;
    }
    let x0 = p.o_inp + row * p.c;
    let d0 = p.o_dout + row * p.c;
    let m = mean_r[p.o_mean + row];
    let rs = rstd_r[p.o_rstd + row];
    var acc = vec2<f32>(0.0, 0.0);
    for (var i = lid; i < p.c; i += WG) {
        let xh = (inp[x0 + i] - m) * rs;
        let g = dout[d0 + i] * weight[p.o_w + i];
        acc += vec2<f32>(g, g * xh);
    }
    let sums = block_sum(acc, lid) / f32(p.c);
    let y0 = p.o_out + row * p.c;
    for (var i = lid; i < p.c; i += WG) {
        let xh = (inp[x0 + i] - m) * rs;
        let g = dout[d0 + i] * weight[p.o_w + i];
        let dx = rs * (g - sums.x - xh * sums.y);
        if (p.accumulate != 0u) {
            dst[y0 + i] = dst[y0 + i] + dx;
        } else {
            dst[y0 + i] = dx;
        }
    }
}

// grid: x = column blocks of 64, y = row blocks of rows_per_block
@compute @workgroup_size(64)
fn ln_backward_partials(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = wid.x * 64u + lid;
    let rb = wid.y;
    if (i >= p.c) {
        return;
    }
    let r0 = rb * p.rows_per_block;
    let r1 = min(p.n, r0 + p.rows_per_block);
    var sw = 0.0;
    var sb = 0.0;
    for (var r = r0; r < r1; r++) {
        let d = dout[p.o_dout + r * p.c + i];
        let xh = (inp[p.o_inp + r * p.c + i] - mean_r[p.o_mean + r]) * rstd_r[p.o_rstd + r];
        sw += d * xh;
        sb += d;
    }
    part_w[2u * rb * p.c + i] = sw;
    part_w[(2u * rb + 1u) * p.c + i] = sb;
}

@compute @workgroup_size(64)
fn ln_backward_finalize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.c) {
        return;
    }
    var sw = 0.0;
    var sb = 0.0;
    for (var rb = 0u; rb < p.nblocks; rb++) {
        sw += part_r[2u * rb * p.c + i];
        sb += part_r[(2u * rb + 1u) * p.c + i];
    }
    dweight[p.o_dw + i] = dweight[p.o_dw + i] + sw;
    dbias[p.o_db + i] = dbias[p.o_db + i] + sb;
}
