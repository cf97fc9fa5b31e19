// matmul.wgsl — C (m×n) = or += op(A)·op(B) (+ bias), register-tiled: a workgroup of WG invocations
// owns a BM×BN tile of C (64×64 with 64 invocations, or 128×128 with 256 when the host specialises
// BM/BN/BK/WG), each invocation an 8×8 block held in registers; A and B are read as vec4 and staged
// through workgroup memory in k-slices of BK.
// lda/ldb/ldc are row strides in floats; o_a/o_b are offsets in vec4s (tiled) or floats (naive, colsum).
// mm_nt:  C[i,j] (= | +=) Σ_k A[i,k]·B[j,k] (+ bias[j])   forward out = x·Wᵀ + b   (A, B k-contiguous)
// mm_nn:  C[i,j] (= | +=) Σ_k A[i,k]·B[k,j]               backward dinp = dout·W
// mm_tn:  C[i,j] (= | +=) Σ_k A[k,i]·B[k,j]               backward dW += doutᵀ·x
// mm_naive: C[i,j] (= | +=) Σ_k A[o_a + i·sam + k·sak]·B[o_b + k·sbk + j·sbn] (+ bias[j])   any strides (fallback)
// colsum_partial:  part[rb·n + j] = Σ_{i ∈ rows [rb·k, rb·k + k)} A[o_a + i·lda + j]
// colsum_finalize: dbias[o_bias + j] += Σ_{rb < ldc} part[rb·n + j]          (dbias += Σ_rows dout)
// mm_nt_sg / mm_nn_sg / mm_tn_sg: mm_nt / mm_nn / mm_tn with no workgroup memory: each A value is
//   loaded by one lane of an 8-lane group and shared by subgroupShuffle, B is read directly
//   (64×64 tiles, 64 invocations; needs subgroups of ≥ 8 lanes laid out along local_invocation_index)
// mm_splitk_reduce: C[i,j] (= | +=) Σ_z part[z][i][j] (+ bias[j])   — when few tiles share a long k, the
//   tiled kernels run k in slices (grid z; sam = k per slice, sak = slices) writing partial C to part
// Tiled kernels need k (nt, nn), m (tn) and n (nn, tn) multiples of 4 and vec4-aligned views; the
// host falls back to mm_naive otherwise.
// B's element type is WeightT: f32 as written; the host specialises it to f16 for the forward with
// f16 weights (inference; `enable f16;`), every B load converting to f32 (accumulation is f32).

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

// the element type of B (binding 2 and 6)
alias WeightT = f32;

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<WeightT>>;
@group(0) @binding(3) var<storage, read_write> cm: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> a1: array<f32>;
@group(0) @binding(6) var<storage, read> b1: array<WeightT>;
@group(0) @binding(7) var<storage, read_write> part_w: array<f32>;
@group(0) @binding(8) var<storage, read> part_r: array<f32>;
@group(0) @binding(9) var<storage, read_write> dbias: array<f32>;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const WG: u32 = 64u;
// invocations along n; vec4s per k-row of a tile
const TX: u32 = BN / 8u;
const AV: u32 = BM / 4u;
const BV: u32 = BN / 4u;

// [BK][BM/4] and [BK][BN/4]: k-major so an invocation reads its 8 rows (cols) as two vec4s
var<workgroup> As: array<vec4<f32>, BK * BM / 4u>;
var<workgroup> Bs: array<vec4<f32>, BK * BN / 4u>;

// A tile (rows m0.., k0..k0+BK) from a k-contiguous A, transposed into As
fn load_a_kc(m0: u32, k0: u32, lid: u32) {
    for (var idx = lid; idx < BM * BK / 4u; idx += WG) {
        let r = idx / (BK / 4u);
        let kv = idx % (BK / 4u);
        let gm = m0 + r;
        let gk = k0 + kv * 4u;
        var v = vec4<f32>(0.0);
        if (gm < p.m && gk < p.k) {
            v = a4[p.o_a + gm * (p.lda / 4u) + gk / 4u];
        }
        let col = r / 4u;
        let comp = r % 4u;
        As[(kv * 4u + 0u) * AV + col][comp] = v.x;
        As[(kv * 4u + 1u) * AV + col][comp] = v.y;
        As[(kv * 4u + 2u) * AV + col][comp] = v.z;
        As[(kv * 4u + 3u) * AV + col][comp] = v.w;
    }
}

// B tile (rows n0.. of a k-contiguous B, i.e. Bᵀ), transposed into Bs
fn load_b_kc(n0: u32, k0: u32, lid: u32) {
    for (var idx = lid; idx < BN * BK / 4u; idx += WG) {
        let r = idx / (BK / 4u);
        let kv = idx % (BK / 4u);
        let gn = n0 + r;
        let gk = k0 + kv * 4u;
        var v = vec4<f32>(0.0);
        if (gn < p.n && gk < p.k) {
            v = vec4<f32>(b4[p.o_b + gn * (p.ldb / 4u) + gk / 4u]);
        }
        let col = r / 4u;
        let comp = r % 4u;
        Bs[(kv * 4u + 0u) * BV + col][comp] = v.x;
        Bs[(kv * 4u + 1u) * BV + col][comp] = v.y;
        Bs[(kv * 4u + 2u) * BV + col][comp] = v.z;
        Bs[(kv * 4u + 3u) * BV + col][comp] = v.w;
    }
}

// A tile from an m-contiguous A (A[k, i] at k·lda + i), copied into As
fn load_a_mc(m0: u32, k0: u32, lid: u32) {
    for (var idx = lid; idx < BM * BK / 4u; idx += WG) {
        let kr = idx / AV;
        let mv = idx % AV;
        let gk = k0 + kr;
        let gm = m0 + mv * 4u;
        var v = vec4<f32>(0.0);
        if (gk < p.k && gm < p.m) {
            v = a4[p.o_a + gk * (p.lda / 4u) + gm / 4u];
        }
        As[kr * AV + mv] = v;
    }
}

// B tile from an n-contiguous B (B[k, j] at k·ldb + j), copied into Bs
fn load_b_nc(n0: u32, k0: u32, lid: u32) {
    for (var idx = lid; idx < BN * BK / 4u; idx += WG) {
        let kr = idx / BV;
        let nv = idx % BV;
        let gk = k0 + kr;
        let gn = n0 + nv * 4u;
        var v = vec4<f32>(0.0);
        if (gk < p.k && gn < p.n) {
            v = vec4<f32>(b4[p.o_b + gk * (p.ldb / 4u) + gn / 4u]);
        }
        Bs[kr * BV + nv] = v;
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
        let a0 = As[kk * AV + tm * 2u];
        let a1_ = As[kk * AV + tm * 2u + 1u];
        let b0 = Bs[kk * BV + tn * 2u];
        let b1_ = Bs[kk * BV + tn * 2u + 1u];
        fma_block(acc, a0, a1_, b0, b1_);
    }
}

// one C row segment: columns c0..c0+8 of row gm from two vec4s (masked at the edges)
fn store_row(gm: u32, c0: u32, v0: vec4<f32>, v1: vec4<f32>, z: u32) {
    if (gm >= p.m) {
        return;
    }
    let vals = array<f32, 8>(v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w);
    for (var j = 0u; j < 8u; j++) {
        let gn = c0 + j;
        if (gn < p.n && p.sak != 0u) {
            // split-K: this slice's partial C, summed by mm_splitk_reduce
            part_w[(z * p.m + gm) * p.n + gn] = vals[j];
        } else if (gn < p.n) {
            var val = vals[j];
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

// constant indices only, so the accumulators can stay in registers
fn store_block(acc: ptr<function, array<vec4<f32>, 16>>, r0: u32, c0: u32, z: u32) {
    store_row(r0 + 0u, c0, (*acc)[0], (*acc)[1], z);
    store_row(r0 + 1u, c0, (*acc)[2], (*acc)[3], z);
    store_row(r0 + 2u, c0, (*acc)[4], (*acc)[5], z);
    store_row(r0 + 3u, c0, (*acc)[6], (*acc)[7], z);
    store_row(r0 + 4u, c0, (*acc)[8], (*acc)[9], z);
    store_row(r0 + 5u, c0, (*acc)[10], (*acc)[11], z);
    store_row(r0 + 6u, c0, (*acc)[12], (*acc)[13], z);
    store_row(r0 + 7u, c0, (*acc)[14], (*acc)[15], z);
}

// The k range of split-K slice z: [z·sam, min(k, (z+1)·sam)), or all of k when sam = 0.
// Slices are multiples of BK (and of 4), so tiles never straddle two slices.
fn k_range(z: u32) -> vec2<u32> {
    if (p.sam == 0u) {
        return vec2<u32>(0u, p.k);
    }
    return vec2<u32>(z * p.sam, min(p.k, (z + 1u) * p.sam));
}

// grid: (ceil(n/BN), ceil(m/BM), split-K slices)
@compute @workgroup_size(WG)
fn mm_nt(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / TX;
    let tn = lid % TX;
    var acc: array<vec4<f32>, 16>;
    let kr = k_range(wid.z);
    for (var k0 = kr.x; k0 < kr.y; k0 += BK) {
        load_a_kc(m0, k0, lid);
        load_b_kc(n0, k0, lid);
        workgroupBarrier();
        compute_tile(&acc, tm, tn);
        workgroupBarrier();
    }
    store_block(&acc, m0 + tm * 8u, n0 + tn * 8u, wid.z);
}

@compute @workgroup_size(WG)
fn mm_nn(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / TX;
    let tn = lid % TX;
    var acc: array<vec4<f32>, 16>;
    let kr = k_range(wid.z);
    for (var k0 = kr.x; k0 < kr.y; k0 += BK) {
        load_a_kc(m0, k0, lid);
        load_b_nc(n0, k0, lid);
        workgroupBarrier();
        compute_tile(&acc, tm, tn);
        workgroupBarrier();
    }
    store_block(&acc, m0 + tm * 8u, n0 + tn * 8u, wid.z);
}

@compute @workgroup_size(WG)
fn mm_tn(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = lid / TX;
    let tn = lid % TX;
    var acc: array<vec4<f32>, 16>;
    let kr = k_range(wid.z);
    for (var k0 = kr.x; k0 < kr.y; k0 += BK) {
        load_a_mc(m0, k0, lid);
        load_b_nc(n0, k0, lid);
        workgroupBarrier();
        compute_tile(&acc, tm, tn);
        workgroupBarrier();
    }
    store_block(&acc, m0 + tm * 8u, n0 + tn * 8u, wid.z);
}

// B[k, j..j+8] of an n-contiguous B as two vec4s (zeros past n)
fn load_b_row8(k: u32, nb: u32) -> array<vec4<f32>, 2> {
    // branch-free: clamped addresses, zeros selected past the edges
    let kc = min(k, p.k - 1u);
    let base = p.o_b + kc * (p.ldb / 4u);
    let c0 = min(nb, p.n - 4u) / 4u;
    let c1 = min(nb + 4u, p.n - 4u) / 4u;
    let z = vec4<f32>(0.0);
    let v0 = select(z, vec4<f32>(b4[base + c0]), k < p.k && nb < p.n);
    let v1 = select(z, vec4<f32>(b4[base + c1]), k < p.k && nb + 4u < p.n);
    return array<vec4<f32>, 2>(v0, v1);
}

// split-K: C[i,j] (= | +=) Σ_{z < sak} part[(z·m + i)·n + j] (+ bias[j]), slices summed in order
@compute @workgroup_size(256)
fn mm_splitk_reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = p.m * p.n;
    let stride = nwg.x * 256u;
    for (var e = gid.x; e < total; e += stride) {
        var s = 0.0;
        for (var z = 0u; z < p.sak; z++) {
            s += part_r[z * total + e];
        }
        let i = e / p.n;
        let j = e - i * p.n;
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
        s += a1[p.o_a + i * p.sam + k * p.sak] * f32(b1[p.o_b + k * p.sbk + j * p.sbn]);
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

// acc row i, cols 0..8 += (ar[i]·bv[j])_j : C = A·Bᵀ over 4 k values (constant indices only)
fn fma_dot(acc: ptr<function, array<vec4<f32>, 16>>, ar: array<vec4<f32>, 8>, bv: array<vec4<f32>, 8>) {
    for (var i = 0u; i < 8u; i++) {
        let a = ar[i];
        (*acc)[2u * i] += vec4<f32>(dot(a, bv[0]), dot(a, bv[1]), dot(a, bv[2]), dot(a, bv[3]));
        (*acc)[2u * i + 1u] += vec4<f32>(dot(a, bv[4]), dot(a, bv[5]), dot(a, bv[6]), dot(a, bv[7]));
    }
}

// acc row i += Σ_kk ar[i][kk]·B[kk, cols] with B rows given as (lo, hi) vec4 pairs
fn fma_rows(acc: ptr<function, array<vec4<f32>, 16>>, ar: array<vec4<f32>, 8>, b: array<vec4<f32>, 8>) {
    for (var i = 0u; i < 8u; i++) {
        let a = ar[i];
        (*acc)[2u * i] += a.x * b[0] + a.y * b[2] + a.z * b[4] + a.w * b[6];
        (*acc)[2u * i + 1u] += a.x * b[1] + a.y * b[3] + a.z * b[5] + a.w * b[7];
    }
}

@compute @workgroup_size(64)
fn mm_nt_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    let tm = lid / 8u;
    let tn = lid % 8u;
    let lane0 = sl - tn;
    let ld4a = p.lda / 4u;
    let ld4b = p.ldb / 4u;
    let abase = p.o_a + min(m0 + tm * 8u + tn, p.m - 1u) * ld4a;
    let nb = n0 + tn * 8u;
    let nl = p.n - 1u;
    let b0 = p.o_b + min(nb + 0u, nl) * ld4b;
    let b1 = p.o_b + min(nb + 1u, nl) * ld4b;
    let b2 = p.o_b + min(nb + 2u, nl) * ld4b;
    let b3 = p.o_b + min(nb + 3u, nl) * ld4b;
    let b4_ = p.o_b + min(nb + 4u, nl) * ld4b;
    let b5 = p.o_b + min(nb + 5u, nl) * ld4b;
    let b6 = p.o_b + min(nb + 6u, nl) * ld4b;
    let b7 = p.o_b + min(nb + 7u, nl) * ld4b;
    var acc: array<vec4<f32>, 16>;
    let kr = k_range(wid.z);
    for (var k4 = kr.x / 4u; k4 < kr.y / 4u; k4++) {
        let ar = shared_a_rows(a4[abase + k4], lane0);
        let bv = array<vec4<f32>, 8>(
            vec4<f32>(b4[b0 + k4]), vec4<f32>(b4[b1 + k4]), vec4<f32>(b4[b2 + k4]), vec4<f32>(b4[b3 + k4]),
            vec4<f32>(b4[b4_ + k4]), vec4<f32>(b4[b5 + k4]), vec4<f32>(b4[b6 + k4]), vec4<f32>(b4[b7 + k4]),
        );
        fma_dot(&acc, ar, bv);
    }
    store_block(&acc, m0 + tm * 8u, nb, wid.z);
}

@compute @workgroup_size(64)
fn mm_nn_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    let tm = lid / 8u;
    let tn = lid % 8u;
    let lane0 = sl - tn;
    let abase = p.o_a + min(m0 + tm * 8u + tn, p.m - 1u) * (p.lda / 4u);
    let nb = n0 + tn * 8u;
    var acc: array<vec4<f32>, 16>;
    let kr = k_range(wid.z);
    for (var k4 = kr.x / 4u; k4 < kr.y / 4u; k4++) {
        let ar = shared_a_rows(a4[abase + k4], lane0);
        let k = k4 * 4u;
        let r0 = load_b_row8(k, nb);
        let r1 = load_b_row8(k + 1u, nb);
        let r2 = load_b_row8(k + 2u, nb);
        let r3 = load_b_row8(k + 3u, nb);
        let b = array<vec4<f32>, 8>(r0[0], r0[1], r1[0], r1[1], r2[0], r2[1], r3[0], r3[1]);
        fma_rows(&acc, ar, b);
    }
    store_block(&acc, m0 + tm * 8u, nb, wid.z);
}
// A (k-major, m-contiguous) for k..k+4 and rows mb..mb+8: lane tn loads A[k + tn/2, mb + 4·(tn%2) ..+4];
// row i of the result holds A[k..k+4, mb + i] after the shuffles
@compute @workgroup_size(64)
fn mm_tn_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    let tm = lid / 8u;
    let tn = lid % 8u;
    let lane0 = sl - tn;
    let mb = m0 + tm * 8u;
    let nb = n0 + tn * 8u;
    let my_m = mb + 4u * (tn % 2u);
    var acc: array<vec4<f32>, 16>;
    let kr = k_range(wid.z);
    for (var k = kr.x; k < kr.y; k += 4u) {
        let ka = k + tn / 2u;
        var av = vec4<f32>(0.0);
        if (ka < p.k && my_m < p.m) {
            av = a4[p.o_a + ka * (p.lda / 4u) + my_m / 4u];
        }
        // (k+kk) row of A, columns mb..mb+4 and mb+4..mb+8
        let k0a = subgroupShuffle(av, lane0 + 0u);
        let k0b = subgroupShuffle(av, lane0 + 1u);
        let k1a = subgroupShuffle(av, lane0 + 2u);
        let k1b = subgroupShuffle(av, lane0 + 3u);
        let k2a = subgroupShuffle(av, lane0 + 4u);
        let k2b = subgroupShuffle(av, lane0 + 5u);
        let k3a = subgroupShuffle(av, lane0 + 6u);
        let k3b = subgroupShuffle(av, lane0 + 7u);
        let r0 = load_b_row8(k, nb);
        let r1 = load_b_row8(k + 1u, nb);
        let r2 = load_b_row8(k + 2u, nb);
        let r3 = load_b_row8(k + 3u, nb);
        fma_block(&acc, k0a, k0b, r0[0], r0[1]);
        fma_block(&acc, k1a, k1b, r1[0], r1[1]);
        fma_block(&acc, k2a, k2b, r2[0], r2[1]);
        fma_block(&acc, k3a, k3b, r3[0], r3[1]);
    }
    store_block(&acc, mb, nb, wid.z);
}
//#endif
