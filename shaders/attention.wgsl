// attention.wgsl — causal multi-head self-attention, flash style: no (t,t) matrix is stored; the forward
// keeps the softmax statistics lse and the backward recomputes p from them. qkv rows are [q | k | v]
// (3c wide), head h uses features [h·HS, (h+1)·HS). One invocation per query (or key) row, key/query
// tiles staged in workgroup memory. HS, BK and BQT are specialised by the host per head size
// (the values below are the defaults for HS = 64).
// attn_forward:   s_u = q_t·k_u·scale (u ≤ t), online softmax; out_t = Σ_u softmax(s)_u·v_u; lse_t = max + ln Σ exp(s − max)
// attn_backward_d: D[b,h,t] = Σ_i dout[b,t,h·HS+i]·out[b,t,h·HS+i]
// attn_backward_dq: p = exp(q_t·k_u·scale − lse_t), dp = dout_t·v_u, ds = p·(dp − D_t); dq_t = scale·Σ_{u≤t} ds·k_u
// attn_backward_dkv: same p, ds; dk_u = scale·Σ_{t≥u} ds·q_t;  dv_u = Σ_{t≥u} p·dout_t

const HS: u32 = 64u;
const BK: u32 = 32u;
const BQT: u32 = 16u;
const BQ: u32 = 64u;
const NEG: f32 = -3.0e38;

struct P {
    b: u32,
    t: u32,
    c: u32,
    nh: u32,
    o_qkv: u32,
    o_out: u32,
    o_lse: u32,
    o_dout: u32,
    o_dqkv: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse_w: array<f32>;
@group(0) @binding(4) var<storage, read> out_r: array<f32>;
@group(0) @binding(5) var<storage, read> lse_r: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<f32>;
@group(0) @binding(7) var<storage, read_write> dqkv: array<f32>;
@group(0) @binding(8) var<storage, read_write> dd_w: array<f32>;
@group(0) @binding(9) var<storage, read> dd_r: array<f32>;

var<workgroup> ks: array<f32, BK * HS>;
var<workgroup> vs: array<f32, BK * HS>;

// Stage keys and values [u0, u0 + BK) of head h, batch bb into ks/vs (zeros past t).
fn load_kv(bb: u32, h: u32, u0: u32, lid: u32) {
    for (var e = lid; e < BK * HS; e += BQ) {
        let j = e / HS;
        let i = e - j * HS;
        let u = u0 + j;
        var kv = 0.0;
        var vv = 0.0;
        if (u < p.t) {
            let base = p.o_qkv + (bb * p.t + u) * 3u * p.c + h * HS + i;
            kv = qkv[base + p.c];
            vv = qkv[base + 2u * p.c];
        }
        ks[e] = kv;
        vs[e] = vv;
    }
}

// grid: (ceil(t/BQ), nh, b)
@compute @workgroup_size(64)
fn attn_forward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    let bb = wid.z;
    let q0 = wid.x * BQ;
    let tq = q0 + lid;
    let live = tq < p.t;
    let tr = min(tq, p.t - 1u);
    var q: array<f32, HS>;
    var acc: array<f32, HS>;
    let qbase = p.o_qkv + (bb * p.t + tr) * 3u * p.c + h * HS;
    for (var i = 0u; i < HS; i++) {
        q[i] = qkv[qbase + i] * p.scale;
        acc[i] = 0.0;
    }
    var mx = NEG;
    var l = 0.0;
    let last = min(q0 + BQ, p.t) - 1u;
    let ntiles = last / BK + 1u;
    for (var kt = 0u; kt < ntiles; kt++) {
        let u0 = kt * BK;
        load_kv(bb, h, u0, lid);
        workgroupBarrier();
        if (live && u0 <= tq) {
            var s: array<f32, BK>;
            var tmax = mx;
            for (var j = 0u; j < BK; j++) {
                var sc = NEG;
                if (u0 + j <= tq) {
                    sc = 0.0;
                    for (var i = 0u; i < HS; i++) {
                        sc += q[i] * ks[j * HS + i];
                    }
                }
                s[j] = sc;
                tmax = max(tmax, sc);
            }
            let corr = exp(mx - tmax);
            l *= corr;
            for (var i = 0u; i < HS; i++) {
                acc[i] *= corr;
            }
            for (var j = 0u; j < BK; j++) {
                if (u0 + j <= tq) {
                    let pj = exp(s[j] - tmax);
                    l += pj;
                    for (var i = 0u; i < HS; i++) {
                        acc[i] += pj * vs[j * HS + i];
                    }
                }
            }
            mx = tmax;
        }
        workgroupBarrier();
    }
    if (live) {
        let obase = p.o_out + (bb * p.t + tq) * p.c + h * HS;
        let inv = 1.0 / l;
        for (var i = 0u; i < HS; i++) {
            out_w[obase + i] = acc[i] * inv;
        }
        lse_w[p.o_lse + (bb * p.nh + h) * p.t + tq] = mx + log(l);
    }
}

// one invocation per (b, h, t), grid-stride
@compute @workgroup_size(64)
fn attn_backward_d(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = p.b * p.nh * p.t;
    let stride = nwg.x * 64u;
    for (var e = gid.x; e < total; e += stride) {
        let tt = e % p.t;
        let bh = e / p.t;
        let h = bh % p.nh;
        let bb = bh / p.nh;
        let base = (bb * p.t + tt) * p.c + h * HS;
        var s = 0.0;
        for (var i = 0u; i < HS; i++) {
            s += dout[p.o_dout + base + i] * out_r[p.o_out + base + i];
        }
        dd_w[e] = s;
    }
}

// grid: (ceil(t/BQ), nh, b); one invocation per query row
@compute @workgroup_size(64)
fn attn_backward_dq(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    let bb = wid.z;
    let q0 = wid.x * BQ;
    let tq = q0 + lid;
    let live = tq < p.t;
    let tr = min(tq, p.t - 1u);
    var q: array<f32, HS>;
    var g: array<f32, HS>;
    var dq: array<f32, HS>;
    let qbase = p.o_qkv + (bb * p.t + tr) * 3u * p.c + h * HS;
    let gbase = p.o_dout + (bb * p.t + tr) * p.c + h * HS;
    for (var i = 0u; i < HS; i++) {
        q[i] = qkv[qbase + i] * p.scale;
        g[i] = dout[gbase + i];
        dq[i] = 0.0;
    }
    let st = (bb * p.nh + h) * p.t + tr;
    let lse = lse_r[p.o_lse + st];
    let dd = dd_r[st];
    let last = min(q0 + BQ, p.t) - 1u;
    let ntiles = last / BK + 1u;
    for (var kt = 0u; kt < ntiles; kt++) {
        let u0 = kt * BK;
        load_kv(bb, h, u0, lid);
        workgroupBarrier();
        if (live) {
            for (var j = 0u; j < BK; j++) {
                if (u0 + j <= tq) {
                    var sc = 0.0;
                    var dp = 0.0;
                    for (var i = 0u; i < HS; i++) {
                        sc += q[i] * ks[j * HS + i];
                        dp += g[i] * vs[j * HS + i];
                    }
                    let pr = exp(sc - lse);
                    let ds = pr * (dp - dd);
                    for (var i = 0u; i < HS; i++) {
                        dq[i] += ds * ks[j * HS + i];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let obase = p.o_dqkv + (bb * p.t + tq) * 3u * p.c + h * HS;
        for (var i = 0u; i < HS; i++) {
            dqkv[obase + i] = dq[i] * p.scale;
        }
    }
}

var<workgroup> qs: array<f32, BQT * HS>;
var<workgroup> gs: array<f32, BQT * HS>;
var<workgroup> ls: array<f32, BQT>;
var<workgroup> ds_: array<f32, BQT>;

// grid: (ceil(t/BQ), nh, b); one invocation per key row u, query tiles of BQT staged in workgroup memory
@compute @workgroup_size(64)
fn attn_backward_dkv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    let bb = wid.z;
    let k0 = wid.x * BQ;
    let u = k0 + lid;
    let live = u < p.t;
    let ur = min(u, p.t - 1u);
    var k: array<f32, HS>;
    var v: array<f32, HS>;
    var dk: array<f32, HS>;
    var dv: array<f32, HS>;
    let kbase = p.o_qkv + (bb * p.t + ur) * 3u * p.c + h * HS;
    for (var i = 0u; i < HS; i++) {
        k[i] = qkv[kbase + p.c + i];
        v[i] = qkv[kbase + 2u * p.c + i];
        dk[i] = 0.0;
        dv[i] = 0.0;
    }
    let st0 = (bb * p.nh + h) * p.t;
    let first = k0 / BQT;
    let ntiles = (p.t + BQT - 1u) / BQT;
    for (var qt = first; qt < ntiles; qt++) {
        let t0 = qt * BQT;
        for (var e = lid; e < BQT * HS; e += BQ) {
            let j = e / HS;
            let i = e - j * HS;
            let tt = t0 + j;
            var qv = 0.0;
            var gv = 0.0;
            if (tt < p.t) {
                qv = qkv[p.o_qkv + (bb * p.t + tt) * 3u * p.c + h * HS + i] * p.scale;
                gv = dout[p.o_dout + (bb * p.t + tt) * p.c + h * HS + i];
            }
            qs[e] = qv;
            gs[e] = gv;
        }
        for (var j = lid; j < BQT; j += BQ) {
            let tt = t0 + j;
            var lv = 0.0;
            var dv_ = 0.0;
            if (tt < p.t) {
                lv = lse_r[p.o_lse + st0 + tt];
                dv_ = dd_r[st0 + tt];
            }
            ls[j] = lv;
            ds_[j] = dv_;
        }
        workgroupBarrier();
        if (live) {
            for (var j = 0u; j < BQT; j++) {
                let tt = t0 + j;
                if (tt >= u && tt < p.t) {
                    var sc = 0.0;
                    var dp = 0.0;
                    for (var i = 0u; i < HS; i++) {
                        sc += qs[j * HS + i] * k[i];
                        dp += gs[j * HS + i] * v[i];
                    }
                    let pr = exp(sc - ls[j]);
                    let dsc = pr * (dp - ds_[j]);
                    for (var i = 0u; i < HS; i++) {
                        dv[i] += pr * gs[j * HS + i];
                        dk[i] += dsc * qs[j * HS + i];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let obase = p.o_dqkv + (bb * p.t + u) * 3u * p.c + h * HS;
        for (var i = 0u; i < HS; i++) {
            dqkv[obase + p.c + i] = dk[i];
            dqkv[obase + 2u * p.c + i] = dv[i];
        }
    }
}
