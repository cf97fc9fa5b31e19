// attention.wgsl — causal multi-head self-attention, flash style: no (t,t) matrix is stored; the forward
// keeps the softmax statistics lse and the backward recomputes p from them. qkv rows are [q | k | v]
// (3c wide), head h uses features [h·hs, (h+1)·hs). One invocation per query (or key) row, key/query
// tiles staged in workgroup memory; head vectors are held as vec4s (HS = hs rounded up to 4, the
// padding is zero). HS, BK and BQT are specialised by the host per head size (defaults: hs = 64).
// attn_forward:   s_u = q_t·k_u·scale (u ≤ t), online softmax; out_t = Σ_u softmax(s)_u·v_u; lse_t = max + ln Σ exp(s − max)
// attn_backward_d: D[b,h,t] = Σ_i dout[b,t,h·hs+i]·out[b,t,h·hs+i]
// attn_backward_dq: p = exp(q_t·k_u·scale − lse_t), dp = dout_t·v_u, ds = p·(dp − D_t); dq_t = scale·Σ_{u≤t} ds·k_u
// attn_backward_dkv: same p, ds; dk_u = scale·Σ_{t≥u} ds·q_t;  dv_u = Σ_{t≥u} p·dout_t
// Decoding (KV cache; caches are (slots, tmax, c); row r has slot slots[r] and position pos[r]; here
// p.b = rows of this dispatch and p.t = tmax; these two use p.hs, not HS, and no key tiles):
// kv_store:    kcache[slots[r], pos[r], :] = qkv[r, c..2c];  vcache[slots[r], pos[r], :] = qkv[r, 2c..3c]
// attn_cached: s_u = q_r·kcache[slot, u]·scale (u ≤ pos[r]); out[r, h·hs..] = Σ_u softmax(s)_u·vcache[slot, u]

const HS: u32 = 64u;
const BK: u32 = 32u;
const BQT: u32 = 16u;
const HS4: u32 = HS / 4u;
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
    hs: u32,
    o_kc: u32,
    o_vc: u32,
    o_slots: u32,
    o_pos: u32,
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
@group(0) @binding(10) var<storage, read_write> kc_w: array<f32>;
@group(0) @binding(11) var<storage, read_write> vc_w: array<f32>;
@group(0) @binding(12) var<storage, read> kc_r: array<f32>;
@group(0) @binding(13) var<storage, read> vc_r: array<f32>;
@group(0) @binding(14) var<storage, read> slot_ids: array<i32>;
@group(0) @binding(15) var<storage, read> pos_ids: array<i32>;

var<workgroup> ks: array<vec4<f32>, BK * HS4>;
var<workgroup> vs: array<vec4<f32>, BK * HS4>;

// features i0..i0+4 of a head vector starting at element `base` (zeros past hs)
fn qkv4(base: u32, i0: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (i0 + j < p.hs) {
            r[j] = qkv[base + i0 + j];
        }
    }
    return r;
}

fn dout4(base: u32, i0: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (i0 + j < p.hs) {
            r[j] = dout[base + i0 + j];
        }
    }
    return r;
}

fn store_dqkv4(base: u32, i0: u32, v: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        if (i0 + j < p.hs) {
            dqkv[base + i0 + j] = v[j];
        }
    }
}

// element index of feature 0 of part `part` (0 q, 1 k, 2 v) of head h at row (bb, u)
fn head_base(bb: u32, u: u32, h: u32, part: u32) -> u32 {
    return p.o_qkv + (bb * p.t + u) * 3u * p.c + part * p.c + h * p.hs;
}

// Stage keys and values [u0, u0 + BK) of head h, batch bb into ks/vs (zeros past t).
fn load_kv(bb: u32, h: u32, u0: u32, lid: u32) {
    for (var e = lid; e < BK * HS4; e += BQ) {
        let j = e / HS4;
        let i4 = e - j * HS4;
        let u = u0 + j;
        var kv = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (u < p.t) {
            kv = qkv4(head_base(bb, u, h, 1u), i4 * 4u);
            vv = qkv4(head_base(bb, u, h, 2u), i4 * 4u);
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
    var q: array<vec4<f32>, HS4>;
    var acc: array<vec4<f32>, HS4>;
    let qbase = head_base(bb, tr, h, 0u);
    for (var i = 0u; i < HS4; i++) {
        q[i] = qkv4(qbase, i * 4u) * p.scale;
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
                    var d = vec4<f32>(0.0);
                    for (var i = 0u; i < HS4; i++) {
                        d += q[i] * ks[j * HS4 + i];
                    }
                    sc = d.x + d.y + d.z + d.w;
                }
                s[j] = sc;
                tmax = max(tmax, sc);
            }
            let corr = exp(mx - tmax);
            l *= corr;
            for (var i = 0u; i < HS4; i++) {
                acc[i] *= corr;
            }
            for (var j = 0u; j < BK; j++) {
                if (u0 + j <= tq) {
                    let pj = exp(s[j] - tmax);
                    l += pj;
                    for (var i = 0u; i < HS4; i++) {
                        acc[i] += pj * vs[j * HS4 + i];
                    }
                }
            }
            mx = tmax;
        }
        workgroupBarrier();
    }
    if (live) {
        let obase = p.o_out + (bb * p.t + tq) * p.c + h * p.hs;
        let inv = 1.0 / l;
        for (var i = 0u; i < HS4; i++) {
            let v = acc[i] * inv;
            for (var j = 0u; j < 4u; j++) {
                if (i * 4u + j < p.hs) {
                    out_w[obase + i * 4u + j] = v[j];
                }
            }
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
        let base = (bb * p.t + tt) * p.c + h * p.hs;
        var s = 0.0;
        for (var i = 0u; i < p.hs; i++) {
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
    var q: array<vec4<f32>, HS4>;
    var g: array<vec4<f32>, HS4>;
    var dq: array<vec4<f32>, HS4>;
    let qbase = head_base(bb, tr, h, 0u);
    let gbase = p.o_dout + (bb * p.t + tr) * p.c + h * p.hs;
    for (var i = 0u; i < HS4; i++) {
        q[i] = qkv4(qbase, i * 4u) * p.scale;
        g[i] = dout4(gbase, i * 4u);
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
                    var sc = vec4<f32>(0.0);
                    var dp = vec4<f32>(0.0);
                    for (var i = 0u; i < HS4; i++) {
                        sc += q[i] * ks[j * HS4 + i];
                        dp += g[i] * vs[j * HS4 + i];
                    }
                    let pr = exp(sc.x + sc.y + sc.z + sc.w - lse);
                    let ds = pr * (dp.x + dp.y + dp.z + dp.w - dd);
                    for (var i = 0u; i < HS4; i++) {
                        dq[i] += ds * ks[j * HS4 + i];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let obase = p.o_dqkv + (bb * p.t + tq) * 3u * p.c + h * p.hs;
        for (var i = 0u; i < HS4; i++) {
            store_dqkv4(obase, i * 4u, dq[i] * p.scale);
        }
    }
}

var<workgroup> qs: array<vec4<f32>, BQT * HS4>;
var<workgroup> gs: array<vec4<f32>, BQT * HS4>;
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
    var k: array<vec4<f32>, HS4>;
    var v: array<vec4<f32>, HS4>;
    var dk: array<vec4<f32>, HS4>;
    var dv: array<vec4<f32>, HS4>;
    for (var i = 0u; i < HS4; i++) {
        k[i] = qkv4(head_base(bb, ur, h, 1u), i * 4u);
        v[i] = qkv4(head_base(bb, ur, h, 2u), i * 4u);
    }
    let st0 = (bb * p.nh + h) * p.t;
    let first = k0 / BQT;
    let ntiles = (p.t + BQT - 1u) / BQT;
    for (var qt = first; qt < ntiles; qt++) {
        let t0 = qt * BQT;
        for (var e = lid; e < BQT * HS4; e += BQ) {
            let j = e / HS4;
            let i4 = e - j * HS4;
            let tt = t0 + j;
            var qv = vec4<f32>(0.0);
            var gv = vec4<f32>(0.0);
            if (tt < p.t) {
                qv = qkv4(head_base(bb, tt, h, 0u), i4 * 4u) * p.scale;
                gv = dout4(p.o_dout + (bb * p.t + tt) * p.c + h * p.hs, i4 * 4u);
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
                    var sc = vec4<f32>(0.0);
                    var dp = vec4<f32>(0.0);
                    for (var i = 0u; i < HS4; i++) {
                        sc += qs[j * HS4 + i] * k[i];
                        dp += gs[j * HS4 + i] * v[i];
                    }
                    let pr = exp(sc.x + sc.y + sc.z + sc.w - ls[j]);
                    let dsc = pr * (dp.x + dp.y + dp.z + dp.w - ds_[j]);
                    for (var i = 0u; i < HS4; i++) {
                        dv[i] += pr * gs[j * HS4 + i];
                        dk[i] += dsc * qs[j * HS4 + i];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let obase = p.o_dqkv + (bb * p.t + u) * 3u * p.c + h * p.hs;
        for (var i = 0u; i < HS4; i++) {
            store_dqkv4(obase + p.c, i * 4u, dk[i]);
            store_dqkv4(obase + 2u * p.c, i * 4u, dv[i]);
        }
    }
}

// ---- decoding over a KV cache ----

// cache position of row r (clamped into the cache; ids are checked at upload)
fn row_pos(r: u32) -> u32 {
    return u32(clamp(pos_ids[p.o_pos + r], 0, i32(p.t) - 1));
}

fn row_slot(r: u32) -> u32 {
    return u32(max(slot_ids[p.o_slots + r], 0));
}

// one invocation per (row, channel), grid-stride
@compute @workgroup_size(256)
fn kv_store(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = p.b * p.c;
    let stride = nwg.x * 256u;
    for (var e = gid.x; e < total; e += stride) {
        let r = e / p.c;
        let i = e - r * p.c;
        let dst = (row_slot(r) * p.t + row_pos(r)) * p.c + i;
        let src = p.o_qkv + r * 3u * p.c + p.c + i;
        kc_w[p.o_kc + dst] = qkv[src];
        vc_w[p.o_vc + dst] = qkv[src + p.c];
    }
}

const DWG: u32 = 256u;
// head features per invocation in the value sum: head sizes up to DMAXF·DWG
const DMAXF: u32 = 4u;
const DMAXHS: u32 = DMAXF * DWG;

//#include block_reduce f32

var<workgroup> dc_q: array<f32, DMAXHS>;
var<workgroup> dc_p: array<f32, DWG>;
var<workgroup> dc_acc: array<f32, DWG>;
var<workgroup> dc_slot: u32;
var<workgroup> dc_pos: u32;

// grid: (nh, rows); one workgroup per (row, head). Positions are taken DWG at a time: invocation j
// scores position u0 + j, a workgroup max/sum updates the running softmax (online, f32), then the
// invocations split into `groups` of `lanes` over the head features, each group summing a strided
// part of the chunk's positions; the groups are added in a fixed order at the end.
@compute @workgroup_size(256)
fn attn_cached(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    let r = wid.y;
    if (lid == 0u) {
        dc_slot = row_slot(r);
        dc_pos = row_pos(r);
    }
    let qbase = p.o_qkv + r * 3u * p.c + h * p.hs;
    for (var i = lid; i < p.hs; i += DWG) {
        dc_q[i] = qkv[qbase + i] * p.scale;
    }
    // uniform across the workgroup (and a barrier that publishes dc_q)
    let slot = workgroupUniformLoad(&dc_slot);
    let last = workgroupUniformLoad(&dc_pos);
    let hbase = slot * p.t * p.c + h * p.hs;
    var lanes = p.hs;
    var groups = DWG / max(p.hs, 1u);
    if (p.hs > DWG) {
        lanes = DWG;
        groups = 1u;
    }
    let grp = lid / lanes;
    let il = lid - grp * lanes;
    var acc: array<f32, DMAXF>;
    var mx = NEG;
    var l = 0.0;
    let nchunks = last / DWG + 1u;
    for (var ch = 0u; ch < nchunks; ch++) {
        let u0 = ch * DWG;
        let u = u0 + lid;
        var sc = NEG;
        if (u <= last) {
            let kb = p.o_kc + hbase + u * p.c;
            var d = 0.0;
            for (var i = 0u; i < p.hs; i++) {
                d += dc_q[i] * kc_r[kb + i];
            }
            sc = d;
        }
        let nm = max(mx, block_max(sc, lid));
        let corr = exp(mx - nm);
        var e = 0.0;
        if (u <= last) {
            e = exp(sc - nm);
        }
        dc_p[lid] = e;
        // block_sum's barriers also publish dc_p
        l = l * corr + block_sum(e, lid);
        mx = nm;
        let cnt = min(DWG, last + 1u - u0);
        if (grp < groups) {
            for (var f = 0u; f < DMAXF; f++) {
                acc[f] *= corr;
            }
            for (var j = grp; j < cnt; j += groups) {
                let pj = dc_p[j];
                let vb = p.o_vc + hbase + (u0 + j) * p.c;
                for (var f = 0u; f < DMAXF; f++) {
                    let i = il + f * lanes;
                    if (i < p.hs) {
                        acc[f] += pj * vc_r[vb + i];
                    }
                }
            }
        }
        // dc_p is rewritten by the next chunk
        workgroupBarrier();
    }
    let inv = 1.0 / l;
    let obase = p.o_out + r * p.c + h * p.hs;
    if (groups == 1u) {
        if (grp == 0u) {
            for (var f = 0u; f < DMAXF; f++) {
                let i = il + f * lanes;
                if (i < p.hs) {
                    out_w[obase + i] = acc[f] * inv;
                }
            }
        }
    } else {
        dc_acc[lid] = acc[0];
    }
    workgroupBarrier();
    if (groups > 1u && lid < lanes) {
        var s = 0.0;
        for (var g = 0u; g < groups; g++) {
            s += dc_acc[g * lanes + lid];
        }
        out_w[obase + lid] = s * inv;
    }
}
