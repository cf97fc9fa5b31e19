// classifier.wgsl — fused softmax cross-entropy over the first v of vp logits per row; one workgroup per row.
// crossentropy: loss_r = ln Σ_{i<v} exp(x[r,i]) − x[r,target[r]]   (max-shifted), written to losses[r],
//               or added to it if flags & 2 (accumulate);
//               if flags & 1 (write_grad): x[r,i] = (softmax(x[r,:v])_i − [i = target])·dloss for i < v, 0 for v ≤ i < vp,
//               dloss = seed[o_dloss] (the loss-gradient seed slot of the device scalars)

struct P {
    n: u32,
    v: u32,
    vp: u32,
    o_logits: u32,
    o_losses: u32,
    o_targets: u32,
    flags: u32, // 1 = write_grad, 2 = accumulate the loss
    o_dloss: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> losses: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<i32>;
@group(0) @binding(4) var<storage, read> seed: array<f32>;

const WG: u32 = 256u;
//#include block_reduce f32

@compute @workgroup_size(256)
fn crossentropy(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n) {
        return;
    }
    let base = p.o_logits + row * p.vp;
    let tgt = u32(clamp(targets[p.o_targets + row], 0, i32(p.v) - 1));
    let xt = logits[base + tgt];
    var mx = -3.0e38;
    for (var i = lid; i < p.v; i += WG) {
        mx = max(mx, logits[base + i]);
    }
    mx = block_max(mx, lid);
    // Kahan-compensated per-invocation sum (each invocation adds ~v/256 terms), then a tree sum
    var s = 0.0;
    var comp = 0.0;
    for (var i = lid; i < p.v; i += WG) {
        let y = exp(logits[base + i] - mx) - comp;
        let t = s + y;
        comp = (t - s) - y;
        s = t;
    }
    let z = block_sum(s, lid);
    if (lid == 0u) {
        let l = log(z) + mx - xt;
        if ((p.flags & 2u) != 0u) {
            losses[p.o_losses + row] += l;
        } else {
            losses[p.o_losses + row] = l;
        }
    }
    if ((p.flags & 1u) != 0u) {
        let dloss = seed[p.o_dloss];
        let k = dloss / z;
        for (var i = lid; i < p.vp; i += WG) {
            var g = 0.0;
            if (i < p.v) {
                g = exp(logits[base + i] - mx) * k;
                if (i == tgt) {
                    g -= dloss;
                }
            }
            logits[base + i] = g;
        }
    }
}
