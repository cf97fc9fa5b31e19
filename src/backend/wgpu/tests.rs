//! f16 weights on the wgpu backend: the compiler picks the f16-specialised modules (tiled and
//! subgroup matmuls for aligned weights, not only the naive one), and on an adapter with
//! SHADER_F16 the f16 matmul forward and cached encoder match the cpu backend in every matmul
//! mode, split along k, and with bindings limited to 64 KiB (weights chunked by rows). Without an
//! adapter (or without SHADER_F16) the device tests print why and pass.

use super::compile::{compile, DeviceCaps, MatmulMode};
use super::WgpuBackend;
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::graph::{BufId, BufferTable, DType, Kernel, Launch, Role, View};

fn view(buf: BufId, offset: usize, len: usize) -> View {
    View { buf, offset, len }
}

fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A graph (table, initial data, launches, the buffers to compare) of one test.
struct G {
    table: BufferTable,
    data: Vec<(BufId, Vec<f32>)>,
    ints: Vec<(BufId, Vec<i32>)>,
    launches: Vec<Launch>,
    check: Vec<BufId>,
    name: String,
}

/// out (n, oc) = inp (n, c) · W (oc, c)ᵀ (+ bias) with W f16, the views at these element offsets.
fn matmul(n: usize, c: usize, oc: usize, bias: bool, (oi, ow): (usize, usize)) -> G {
    let mut t = BufferTable::default();
    let inp = t.add("inp", n * c + oi, DType::F32, Role::Activation);
    let w = t.add("weight", oc * c + ow + 1, DType::F16, Role::Param(0));
    let b = t.add("bias", oc, DType::F32, Role::Param(1));
    let out = t.add("out", n * oc, DType::F32, Role::Activation);
    let kernel = Kernel::MatmulForward {
        out: view(out, 0, n * oc),
        inp: view(inp, oi, n * c),
        weight: view(w, ow, oc * c),
        bias: bias.then(|| view(b, 0, oc)),
        n,
        c,
        oc,
    };
    let name = format!("f16 matmul n={n} c={c} oc={oc} bias={bias} offsets {oi}/{ow}");
    G {
        data: vec![
            (inp, fill(n * c + oi, 1 + n as u64, 1.0)),
            (w, fill(oc * c + ow + 1, 2 + c as u64, 0.5)),
            (b, fill(oc, 3, 0.5)),
            (out, vec![0.0; n * oc]),
        ],
        ints: Vec::new(),
        table: t,
        launches: vec![Launch { label: name.clone(), kernel }],
        check: vec![out],
        name,
    }
}

/// out[r] = wte[tokens[r]] + wpe[pos[r]] with the embeddings of these dtypes.
fn encoder_at(vocab: usize, c: usize, tmax: usize, wte_t: DType, wpe_t: DType) -> G {
    let rows = [(5, 0), (vocab as i32 - 1, tmax as i32 - 1), (0, 3), (vocab as i32 / 2, 7), (17, 1)];
    let n = rows.len();
    let mut t = BufferTable::default();
    let tok = t.add("tokens", n, DType::I32, Role::Activation);
    let pos = t.add("pos", n + 1, DType::I32, Role::Activation);
    let wte = t.add("wte", vocab * c + 1, wte_t, Role::Param(0));
    let wpe = t.add("wpe", tmax * c + 3, wpe_t, Role::Param(1));
    let out = t.add("out", n * c + 5, DType::F32, Role::Activation);
    let kernel = Kernel::EncoderAt {
        out: view(out, 5, n * c),
        tokens: view(tok, 0, n),
        pos: view(pos, 1, n),
        wte: view(wte, 1, vocab * c),
        wpe: view(wpe, 3, tmax * c),
        n,
        c,
    };
    let name = format!("encoder_at vocab={vocab} c={c} wte {wte_t} wpe {wpe_t}");
    G {
        data: vec![(wte, fill(vocab * c + 1, 7, 1.0)), (wpe, fill(tmax * c + 3, 8, 0.5)), (out, vec![0.25; n * c + 5])],
        ints: vec![
            (tok, rows.iter().map(|r| r.0).collect()),
            (pos, std::iter::once(-1).chain(rows.iter().map(|r| r.1)).collect()),
        ],
        table: t,
        launches: vec![Launch { label: name.clone(), kernel }],
        check: vec![out],
        name,
    }
}

fn run_on(be: &mut dyn Backend, g: &G) -> Vec<Vec<f32>> {
    be.alloc(&g.table).unwrap_or_else(|e| panic!("{}: alloc: {e}", g.name));
    for (id, d) in &g.data {
        be.upload_f32(*id, d).unwrap();
    }
    for (id, d) in &g.ints {
        be.upload_i32(*id, d).unwrap();
    }
    be.run(&g.launches).unwrap_or_else(|e| panic!("{} on {}: {e}", g.name, be.name()));
    g.check.iter().map(|&id| be.download_f32(id).unwrap()).collect()
}

fn compare(g: &G, what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let tol = 2e-5 + 2e-4 * y.abs();
            assert!((x - y).abs() <= tol, "{} ({what}): buffer {k} [{i}]: wgpu {x} vs cpu {y}", g.name);
        }
    }
}

fn graphs() -> Vec<G> {
    vec![
        // one decode row of GPT-2's qkv projection (weight rows of 1536 bytes), aligned views
        matmul(1, 768, 2304, true, (0, 0)),
        // long k (split along k when forced), vec4-aligned offsets that are not 16-byte aligned in f16
        matmul(4, 1536, 320, false, (4, 4)),
        matmul(33, 64, 256, true, (8, 12)),
        // ≥ 128×128 output tiles (TiledLarge), and a ragged n
        matmul(130, 96, 200, true, (0, 0)),
        // unaligned weight offset and odd k: the naive kernel
        matmul(5, 37, 131, true, (3, 1)),
        // a classifier-like weight of 1000 rows (split by rows under 64 KiB bindings)
        matmul(3, 64, 1000, false, (0, 0)),
        encoder_at(1000, 96, 29, DType::F16, DType::F16),
        encoder_at(300, 64, 29, DType::F16, DType::F32),
        encoder_at(300, 64, 29, DType::F32, DType::F16),
    ]
}

/// Device-free: aligned f16 weights get the f16 tiled/subgroup kernels; unaligned ones the f16
/// naive kernel; no dispatch reads an f16 weight through an f32 module.
#[test]
fn f16_weights_compile_to_f16_modules() {
    let limits = wgpu::Limits::default();
    for mode in [MatmulMode::Tiled, MatmulMode::TiledLarge, MatmulMode::Subgroup] {
        let caps = DeviceCaps::from_limits(&limits, mode);
        for g in graphs() {
            crate::graph::validate(&g.table, &g.launches).unwrap();
            let c = compile(&g.table, &g.launches, &caps).unwrap();
            assert!(!c.dispatches.is_empty());
            for d in &c.dispatches {
                assert!(d.variant.uses_f16(), "{}: {} is not f16", g.name, d.variant.describe());
            }
            let entries: Vec<&str> = c.dispatches.iter().map(|d| d.entry).collect();
            let want = match mode {
                MatmulMode::Subgroup => "mm_nt_sg",
                _ => "mm_nt",
            };
            if g.name.contains("offsets 0/0") || g.name.contains("offsets 8/12") {
                assert!(entries.contains(&want), "{} ({mode:?}): {entries:?}", g.name);
            }
            if g.name.contains("offsets 3/1") {
                assert!(entries.iter().all(|e| *e == "mm_naive"), "{}: {entries:?}", g.name);
            }
        }
    }
    // a 64 KiB binding holds twice as many f16 weight rows as f32 ones
    let mut caps = DeviceCaps::from_limits(&limits, MatmulMode::Tiled);
    caps.max_binding = 64 * 1024;
    let g = matmul(3, 64, 1000, false, (0, 0));
    let c = compile(&g.table, &g.launches, &caps).unwrap();
    assert_eq!(c.dispatches.len(), 3, "1000 rows of 128 bytes in 64 KiB bindings: {} dispatches", c.dispatches.len());
}

fn adapter() -> Option<WgpuBackend> {
    let idx = std::env::var("WGPT_TEST_ADAPTER").ok().and_then(|s| s.parse().ok());
    match WgpuBackend::new(idx) {
        Ok(g) if g.supports(DType::F16) => Some(g),
        Ok(g) => {
            assert!(std::env::var("WGPT_REQUIRE_F16").is_err(), "{} has no SHADER_F16", g.name());
            println!("skipped: {} has no SHADER_F16", g.name());
            None
        }
        Err(e) => {
            assert!(std::env::var("WGPT_REQUIRE_ADAPTER").map_or(true, |v| v != "1"), "no wgpu adapter: {e}");
            println!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

/// Against the cpu reference: every matmul mode, each split along k, then 64 KiB bindings.
#[test]
fn f16_weights_match_cpu_in_every_mode_split_and_chunked() {
    let Some(mut g) = adapter() else { return };
    let mut cpu = CpuBackend::new(Some(2)).unwrap();
    let graphs = graphs();
    let want: Vec<_> = graphs.iter().map(|x| run_on(&mut cpu, x)).collect();
    let target = g.caps().split_k_target;
    for mode in g.matmul_modes() {
        g.set_matmul_mode(mode).unwrap();
        for split in [false, true] {
            g.set_split_k_target(if split { 100_000 } else { target });
            for (x, w) in graphs.iter().zip(&want) {
                compare(x, &format!("{mode:?}, split-K {split}"), &run_on(&mut g, x), w);
            }
        }
    }
    g.set_split_k_target(target);
    g.limit_bindings_for_tests(64 * 1024);
    for mode in g.matmul_modes() {
        g.set_matmul_mode(mode).unwrap();
        for (x, w) in graphs.iter().zip(&want) {
            compare(x, &format!("{mode:?}, 64 KiB bindings"), &run_on(&mut g, x), w);
        }
    }
}
