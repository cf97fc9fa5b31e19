// lib/block_reduce.wgsl — workgroup reductions for 256-invocation workgroups, pasted into a shader by
// `//#include block_reduce <type>` (f32, vec2<f32>, ...: ELEM below becomes that type).
// block_sum: Σ_lid v,  block_max: max_lid v — in a fixed tree order (deterministic); every
// invocation gets the result. Every invocation of the workgroup must call them (they contain barriers).

var<workgroup> red: array<ELEM, 256>;

fn block_sum(v: ELEM, lid: u32) -> ELEM {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn block_max(v: ELEM, lid: u32) -> ELEM {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
