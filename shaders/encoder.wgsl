// encoder.wgsl — token + position embeddings and their gradients. n = b·t rows of c channels.
// The wte view may be bound in chunks of rows [row0, row0 + rows) when it exceeds one binding.
// encoder_forward:      out[r,i] = wte[tokens[r] − row0, i] + wpe[r mod t, i]   (rows whose token lies in this chunk)
// encoder_links:        links[r] = min{r' > r : tokens[r'] = tokens[r]} or NONE;  links[n + r] = 1 if no r' < r has tokens[r], else 0
// encoder_backward_wte: for each first occurrence r of a token in this chunk: dwte[tok − row0, i] += Σ_{r' ∈ chain(r)} dout[r', i]
// encoder_backward_wpe: dwpe[pos, i] += Σ_b dout[b·t + pos, i]
// encoder_at:           out[r,i] = wte[tokens[r] − row0, i] + wpe[pos[r], i]   (decoding: per-row positions; rows whose token lies in this chunk)
// (The chains make dwte deterministic without float atomics: one invocation owns each (token, i).)
// wte and wpe have element types WteT and WpeT: f32 as written; the host specialises them to f16
// for decoding with f16 weights (`enable f16;`), each value converted to f32 as it is read.

struct P {
    n: u32,
    c: u32,
    t: u32,
    b: u32,
    row0: u32,
    rows: u32,
    o_out: u32,
    o_tok: u32,
    o_wte: u32,
    o_wpe: u32,
    o_dout: u32,
    o_pos: u32,
}

const NONE: u32 = 0xffffffffu;

// element types of the embeddings (bindings 3 and 4)
alias WteT = f32;
alias WpeT = f32;

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<i32>;
@group(0) @binding(3) var<storage, read> wte: array<WteT>;
@group(0) @binding(4) var<storage, read> wpe: array<WpeT>;
@group(0) @binding(5) var<storage, read> dout: array<f32>;
@group(0) @binding(6) var<storage, read_write> links_w: array<u32>;
@group(0) @binding(7) var<storage, read> links_r: array<u32>;
@group(0) @binding(8) var<storage, read> pos_ids: array<i32>;

var<workgroup> tile: array<i32, 256>;

@compute @workgroup_size(256)
fn encoder_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    let total = p.n * p.c;
    for (var e = gid.x; e < total; e += stride) {
        let r = e / p.c;
        let i = e - r * p.c;
        let tok = tokens[p.o_tok + r];
        if (tok >= 0) {
            let rel = u32(tok) - p.row0;
            if (u32(tok) >= p.row0 && rel < p.rows) {
                let pos = r % p.t;
                dst[p.o_out + e] = f32(wte[p.o_wte + rel * p.c + i]) + f32(wpe[p.o_wpe + pos * p.c + i]);
            }
        }
    }
}

@compute @workgroup_size(256)
fn encoder_links(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = (wid.x + wid.y * nwg.x) * 256u + lid;
    let valid = r < p.n;
    var tok = 0;
    if (valid) {
        tok = tokens[p.o_tok + r];
    }
    var next = NONE;
    var first = 1u;
    let ntiles = (p.n + 255u) / 256u;
    for (var tb = 0u; tb < ntiles; tb++) {
        let j = tb * 256u + lid;
        if (j < p.n) {
            tile[lid] = tokens[p.o_tok + j];
        }
        workgroupBarrier();
        let cnt = min(256u, p.n - tb * 256u);
        for (var q = 0u; q < cnt; q++) {
            let rr = tb * 256u + q;
            if (tile[q] == tok && rr != r) {
                if (rr < r) {
                    first = 0u;
                } else if (next == NONE) {
                    next = rr;
                }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        links_w[r] = next;
        links_w[p.n + r] = first;
    }
}

@compute @workgroup_size(256)
fn encoder_backward_wte(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    let total = p.n * p.c;
    for (var e = gid.x; e < total; e += stride) {
        let r = e / p.c;
        let i = e - r * p.c;
        if (links_r[p.n + r] == 0u) {
            continue;
        }
        let tok = tokens[p.o_tok + r];
        if (tok < 0) {
            continue;
        }
        let rel = u32(tok) - p.row0;
        if (u32(tok) < p.row0 || rel >= p.rows) {
            continue;
        }
        var s = 0.0;
        var q = r;
        loop {
            s += dout[p.o_dout + q * p.c + i];
            q = links_r[q];
            if (q == NONE) {
                break;
            }
        }
        let d = p.o_out + rel * p.c + i;
        dst[d] = dst[d] + s;
    }
}

@compute @workgroup_size(256)
fn encoder_backward_wpe(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    let total = p.t * p.c;
    for (var e = gid.x; e < total; e += stride) {
        let pos = e / p.c;
        let i = e - pos * p.c;
        var s = 0.0;
        for (var bb = 0u; bb < p.b; bb++) {
            s += dout[p.o_dout + (bb * p.t + pos) * p.c + i];
        }
        dst[p.o_out + e] = dst[p.o_out + e] + s;
    }
}

@compute @workgroup_size(256)
fn encoder_at(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    let total = p.n * p.c;
    for (var e = gid.x; e < total; e += stride) {
        let r = e / p.c;
        let i = e - r * p.c;
        let tok = tokens[p.o_tok + r];
        if (tok >= 0) {
            let rel = u32(tok) - p.row0;
            if (u32(tok) >= p.row0 && rel < p.rows) {
                let pos = u32(max(pos_ids[p.o_pos + r], 0));
                dst[p.o_out + e] = f32(wte[p.o_wte + rel * p.c + i]) + f32(wpe[p.o_wpe + pos * p.c + i]);
            }
        }
    }
}
