// matmul.wgsl — C (m×n) = or += op(A)·op(B) (+ bias), register-tiled: a workgroup of 64 invocations
// owns a 64×64 tile of C, each invocation an 8×8 block held in registers; A and B are read as vec4.
// lda/ldb/ldc are row strides in floats; o_a/o_b are offsets in vec4s (tiled) or floats (naive, colsum).
// mm_nt:  C[i,j] (= | +=) Σ_k A[i,k]·B[j,k] (+ bias[j])   forward out = x·Wᵀ + b   (A, B k-contiguous)
// mm_nn:  C[i,j] (= | +=) Σ_k A[i,k]·B[k,j]               backward dinp = dout·W
// mm_tn:  C[i,j] (= | +=) Σ_k A[k,i]·B[k,j]               backward dW += doutᵀ·x
// mm_tn_direct: mm_tn's maths with operands read straight from memory (no workgroup staging)
// mm_naive: C[i,j] (= | +=) Σ_k A[o_a + i·sam + k·sak]·B[o_b + k·sbk + j·sbn] (+ bias[j])   any strides (fallback)
// colsum_partial:  part[rb·n + j] = Σ_{i ∈ rows [rb·k, rb·k + k)} A[o_a + i·lda + j]
// colsum_finalize: dbias[o_bias + j] += Σ_{rb < ldc} part[rb·n + j]          (dbias += Σ_rows dout)
// mm_nt_sg / mm_nn_sg: mm_nt / mm_nn with each A row loaded by one lane and shared across 8 lanes by
//   subgroupShuffle (needs subgroups of ≥ 8 lanes laid out along local_invocation_index)
// Tiled kernels need k (nt, nn), m (tn) and n (nn, tn) multiples of 4 and 16-byte aligned views; the
// host falls back to mm_naive otherwise.

struct P {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    o_a: u32,
    o_b: u32,
    o_c: u32,
    o_bias: u32,
    has_bias: u32,
    accum: u32,
    sam: u32,
    sak: u32,
    sbk: u32,
    sbn: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> cm: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> a1: array<f32>;
@group(0) @binding(6) var<storage, read> b1: array<f32>;
@group(0) @binding(7) var<storage, read_write> part_w: array<f32>;
@group(0) @binding(8) var<storage, read> part_r: array<f32>;
@group(0) @binding(9) var<storage, read_write> dbias: array<f32>;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

// [BK][BM/4] and [BK][BN/4]: k-major so an invocation reads its 8 rows (cols) as two vec4s
var<workgroup> As: array<vec4<f32>, 256>;
var<workgroup> Bs: array<vec4<f32>, 256>;

// A tile (rows m0.., k0..k0+BK) from a k-contiguous A, transposed into As
fn load_a_kc(m0: u32, k0: u32, lid: u32) {
    for (var s = 0u; s < 4u; s++) {
        let idx = lid + s * 64u;
        let r = idx / 4u;
        let kv = idx % 4u;
        let gm = m0 + r;
        let gk = k0 + kv * 4u;
        var v = vec4<f32>(0.0);
        if (gm < p.m && gk < p.k) {
            v = a4[p.o_a + gm * (p.lda / 4u) + gk / 4u];
        }
        let col = r / 4u;
        let comp = r % 4u;
        As[(kv * 4u + 0u) * 16u + col][comp] = v.x;
        As[(kv * 4u + 1u) * 16u + col][comp] = v.y;
        As[(kv * 4u + 2u) * 16u + col][comp] = v.z;
        As[(kv * 4u + 3u) * 16u + col][comp] = v.w;
    }
}

// B tile (rows n0.. of a k-contiguous B, i.e. Bᵀ), transposed into Bs
fn load_b_kc(n0: u32, k0: u32, lid: u32) {
    for (var s = 0u; s < 4u; s++) {
        let idx = lid + s * 64u;
        let r = idx / 4u;
        let kv = idx % 4u;
        let gn = n0 + r;
        let gk = k0 + kv * 4u;
        var v = vec4<f32>(0.0);
        if (gn < p.n && gk < p.k) {
            v = b4[p.o_b + gn * (p.ldb / 4u) + gk / 4u];
        }
        let col = r / 4u;
        let comp = r % 4u;
        Bs[(kv * 4u + 0u) * 16u + col][comp] = v.x;
        Bs[(kv * 4u + 1u) * 16u + col][comp] = v.y;
        Bs[(kv * 4u + 2u) * 16u + col][comp] = v.z;
        Bs[(kv * 4u + 3u) * 16u + col][comp] = v.w;
    }
}

// A tile from an m-contiguous A (A[k, i] at k·lda + i), copied into As
fn load_a_mc(m0: u32, k0: u32, lid: u32) {
    for (var s = 0u; s < 4u; s++) {
        let idx = lid + s * 64u;
        let kr = idx / 16u;
        let mv = idx % 16u;
        let gk = k0 + kr;
        let gm = m0 + mv * 4u;
        var v = vec4<f32>(0.0);
        if (gk < p.k && gm < p.m) {
            v = a4[p.o_a + gk * (p.lda / 4u) + gm / 4u];
        }
        As[kr * 16u + mv] = v;
    }
}

// B tile from an n-contiguous B (B[k, j] at k·ldb + j), copied into Bs
fn load_b_nc(n0: u32, k0: u32, lid: u32) {
    for (var s = 0u; s < 4u; s++) {
        let idx = lid + s * 64u;
        let kr = idx / 16u;
        let nv = idx % 16u;
        let gk = k0 + kr;
        let gn = n0 + nv * 4u;
        var v = vec4<f32>(0.0);
        if (gk < p.k && gn < p.n) {
            v = b4[p.o_b + gk * (p.ldb / 4u) + gn / 4u];
        }
        Bs[kr * 16u + nv] = v;
    }
}

// acc[2i + jj] holds C rows tm·8 + i, cols tn·8 + 4·jj .. +4:  acc += a ⊗ b
fn fma_block(acc: ptr<function, array<vec4<f32>, 16>>, a0: vec4<f32>, a1_: vec4<f32>, b0: vec4<f32>, b1_: vec4<f32>) {
    (*acc)[0] += a0.x * b0;
    (*acc)[1] += a0.x * b1_;
    (*acc)[2] += a0.y * b0;
    (*acc)[3] += a0.y * b1_;
    (*acc)[4] += a0.z * b0;
    (*acc)[5] += a0.z * b1_;
    (*acc)[6] += a0.w * b0;
    (*acc)[7] += a0.w * b1_;
    (*acc)[8] += a1_.x * b0;
    (*acc)[9] += a1_.x * b1_;
    (*acc)[10] += a1_.y * b0;
    (*acc)[11] += a1_.y * b1_;
    (*acc)[12] += a1_.z * b0;
    (*acc)[13] += a1_.z * b1_;
    (*acc)[14] += a1_.w * b0;
    (*acc)[15] += a1_.w * b1_;
}

fn compute_tile(acc: ptr<function, array<vec4<f32>, 16>>, tm: u32, tn: u32) {
    for (var kk = 0u; kk < BK; kk++) {
        let a0 = As[kk * 16u + tm * 2u];
        let a1_ = As[kk * 16u + tm * 2u + 1u];
        let b0 = Bs[kk * 16u + tn * 2u];
        let b1_ = Bs[kk * 16u + tn * 2u + 1u];
        fma_block(acc, a0, a1_, b0, b1_);
    }
}

fn store_block(acc: ptr<function, array<vec4<f32>, 16>>, r0: u32, c0: u32) {
    for (var i = 0u; i < 8u; i++) {
        let gm = r0 + i;
        if (gm >= p.m) {
            break;
        }
        for (var j = 0u; j < 8u; j++) {
            let gn = c0 + j;
            if (gn >= p.n) {
                break;
            }
            var val = (*acc)[2u * i + j / 4u][j % 4u];
            if (p.has_bias != 0u) {
                val += bias[p.o_bias + gn];
            }
            let idx = p.o_c + gm * p.ldc + gn;
            if (p.accum != 0u) {
                cm[idx] = cm[idx] + val;
            } else {
                cm[idx] = val;
            }
        }
    }
}

// grid: (ceil(n/64), ceil(m/64))
@compute @workgroup_size(64)
fn mm_nt(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / 8u;
    let tn = lid % 8u;
    var acc: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        load_a_kc(m0, k0, lid);
        load_b_kc(n0, k0, lid);
        workgroupBarrier();
        compute_tile(&acc, tm, tn);
        workgroupBarrier();
    }
    store_block(&acc, m0 + tm * 8u, n0 + tn * 8u);
}

@compute @workgroup_size(64)
fn mm_nn(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / 8u;
    let tn = lid % 8u;
    var acc: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        load_a_kc(m0, k0, lid);
        load_b_nc(n0, k0, lid);
        workgroupBarrier();
        compute_tile(&acc, tm, tn);
        workgroupBarrier();
    }
    store_block(&acc, m0 + tm * 8u, n0 + tn * 8u);
}

@compute @workgroup_size(64)
fn mm_tn(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / 8u;
    let tn = lid % 8u;
    var acc: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        load_a_mc(m0, k0, lid);
        load_b_nc(n0, k0, lid);
        workgroupBarrier();
        compute_tile(&acc, tm, tn);
        workgroupBarrier();
    }
    store_block(&acc, m0 + tm * 8u, n0 + tn * 8u);
}

// B[k, j..j+8] of an n-contiguous B as two vec4s (zeros past n)
fn load_b_row8(k: u32, nb: u32) -> array<vec4<f32>, 2> {
    var r: array<vec4<f32>, 2>;
    let base = p.o_b + k * (p.ldb / 4u) + nb / 4u;
    if (nb < p.n) {
        r[0] = b4[base];
    }
    if (nb + 4u < p.n) {
        r[1] = b4[base + 1u];
    }
    return r;
}

@compute @workgroup_size(64)
fn mm_tn_direct(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / 8u;
    let tn = lid % 8u;
    let mb = m0 + tm * 8u;
    let nb = n0 + tn * 8u;
    var acc: array<vec4<f32>, 16>;
    for (var k = 0u; k < p.k; k++) {
        let abase = p.o_a + k * (p.lda / 4u) + mb / 4u;
        var a0 = vec4<f32>(0.0);
        var a1_ = vec4<f32>(0.0);
        if (mb < p.m) {
            a0 = a4[abase];
        }
        if (mb + 4u < p.m) {
            a1_ = a4[abase + 1u];
        }
        let b = load_b_row8(k, nb);
        fma_block(&acc, a0, a1_, b[0], b[1]);
    }
    store_block(&acc, mb, nb);
}

// grid: (ceil(n/16), ceil(m/16))
@compute @workgroup_size(16, 16)
fn mm_naive(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let i = gid.y;
    if (i >= p.m || j >= p.n) {
        return;
    }
    var s = 0.0;
    for (var k = 0u; k < p.k; k++) {
        s += a1[p.o_a + i * p.sam + k * p.sak] * b1[p.o_b + k * p.sbk + j * p.sbn];
    }
    if (p.has_bias != 0u) {
        s += bias[p.o_bias + j];
    }
    let idx = p.o_c + i * p.ldc + j;
    if (p.accum != 0u) {
        cm[idx] = cm[idx] + s;
    } else {
        cm[idx] = s;
    }
}

// grid: (ceil(n/64), row blocks); p.k = rows per block
@compute @workgroup_size(64)
fn colsum_partial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let j = wid.x * 64u + lid;
    if (j >= p.n) {
        return;
    }
    let r0 = wid.y * p.k;
    let r1 = min(p.m, r0 + p.k);
    var s = 0.0;
    for (var i = r0; i < r1; i++) {
        s += a1[p.o_a + i * p.lda + j];
    }
    part_w[wid.y * p.n + j] = s;
}

// p.ldc = number of row blocks
@compute @workgroup_size(64)
fn colsum_finalize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.n) {
        return;
    }
    var s = 0.0;
    for (var rb = 0u; rb < p.ldc; rb++) {
        s += part_r[rb * p.n + j];
    }
    dbias[p.o_bias + j] = dbias[p.o_bias + j] + s;
}

//#if subgroup
// A rows m0 + tm·8 + (0..8) for k4·4 .. +4: lane tn of the 8-lane group loads row tn, the others
// receive it by shuffle. Out-of-range rows are clamped (computed, never stored).
fn shared_a_rows(av: vec4<f32>, lane0: u32) -> array<vec4<f32>, 8> {
    var r: array<vec4<f32>, 8>;
    r[0] = subgroupShuffle(av, lane0 + 0u);
    r[1] = subgroupShuffle(av, lane0 + 1u);
    r[2] = subgroupShuffle(av, lane0 + 2u);
    r[3] = subgroupShuffle(av, lane0 + 3u);
    r[4] = subgroupShuffle(av, lane0 + 4u);
    r[5] = subgroupShuffle(av, lane0 + 5u);
    r[6] = subgroupShuffle(av, lane0 + 6u);
    r[7] = subgroupShuffle(av, lane0 + 7u);
    return r;
}

@compute @workgroup_size(64)
fn mm_nt_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / 8u;
    let tn = lid % 8u;
    let lane0 = sl - tn;
    let abase = p.o_a + min(m0 + tm * 8u + tn, p.m - 1u) * (p.lda / 4u);
    let nb = n0 + tn * 8u;
    var bbase: array<u32, 8>;
    for (var j = 0u; j < 8u; j++) {
        bbase[j] = p.o_b + min(nb + j, p.n - 1u) * (p.ldb / 4u);
    }
    var acc: array<vec4<f32>, 16>;
    for (var k4 = 0u; k4 < p.k / 4u; k4++) {
        let ar = shared_a_rows(a4[abase + k4], lane0);
        var bv: array<vec4<f32>, 8>;
        for (var j = 0u; j < 8u; j++) {
            bv[j] = b4[bbase[j] + k4];
        }
        for (var kk = 0u; kk < 4u; kk++) {
            let a0 = vec4<f32>(ar[0][kk], ar[1][kk], ar[2][kk], ar[3][kk]);
            let a1_ = vec4<f32>(ar[4][kk], ar[5][kk], ar[6][kk], ar[7][kk]);
            let b0 = vec4<f32>(bv[0][kk], bv[1][kk], bv[2][kk], bv[3][kk]);
            let b1_ = vec4<f32>(bv[4][kk], bv[5][kk], bv[6][kk], bv[7][kk]);
            fma_block(&acc, a0, a1_, b0, b1_);
        }
    }
    store_block(&acc, m0 + tm * 8u, nb);
}

@compute @workgroup_size(64)
fn mm_nn_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / 8u;
    let tn = lid % 8u;
    let lane0 = sl - tn;
    let abase = p.o_a + min(m0 + tm * 8u + tn, p.m - 1u) * (p.lda / 4u);
    let nb = n0 + tn * 8u;
    var acc: array<vec4<f32>, 16>;
    for (var k4 = 0u; k4 < p.k / 4u; k4++) {
        let ar = shared_a_rows(a4[abase + k4], lane0);
        for (var kk = 0u; kk < 4u; kk++) {
            let a0 = vec4<f32>(ar[0][kk], ar[1][kk], ar[2][kk], ar[3][kk]);
            let a1_ = vec4<f32>(ar[4][kk], ar[5][kk], ar[6][kk], ar[7][kk]);
            let b = load_b_row8(k4 * 4u + kk, nb);
            fma_block(&acc, a0, a1_, b[0], b[1]);
        }
    }
    store_block(&acc, m0 + tm * 8u, nb);
}
//#endif
