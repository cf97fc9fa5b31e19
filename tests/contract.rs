//! The kernel contract and the backend trait: what `graph::validate` refuses (once, for every
//! backend), true dtype sizes and `Backend::supports`, per-step scalars that a prepared phase
//! reads without being rebuilt, token ids checked at upload, several backends in one process,
//! and error kinds.

use std::io::Write;
use std::path::Path;
use wgpt::backend::cpu::CpuBackend;
use wgpt::backend::wgpu::WgpuBackend;
use wgpt::backend::{Backend, RawBuffer};
use wgpt::error::{Error, ErrorKind};
use wgpt::graph::{build_forward, build_train_step, validate, BufId, BufferTable, DType, Kernel, Launch, Phase, Role, Scalars, TrainOptions, View};
use wgpt::model::checkpoint::read_checkpoint;
use wgpt::model::debug_state::read_debug_state;
use wgpt::model::Config;
use wgpt::train::session::{AdamConsts, Session};

const TINY: &str = "tests/data/tiny";

fn tiny() -> (Config, Vec<f32>, wgpt::model::debug_state::DebugState) {
    let (cfg, params) = read_checkpoint(Path::new(&format!("{TINY}/model.bin"))).unwrap();
    let st = read_debug_state(Path::new(&format!("{TINY}/debug_state.bin")), &cfg).unwrap();
    (cfg, params, st)
}

fn opts(b: usize, t: usize) -> TrainOptions {
    TrainOptions { b, t, grad_accum: 1, weight_decay: 0.0, decay_all: true, grad_clip: 0.0, ..Default::default() }
}

fn gpu() -> Option<WgpuBackend> {
    match WgpuBackend::new(None) {
        Ok(b) => Some(b),
        Err(e @ Error::Unavailable(_)) => {
            if std::env::var("WGPT_REQUIRE_ADAPTER").as_deref() == Ok("1") {
                panic!("WGPT_REQUIRE_ADAPTER=1 but no wgpu adapter: {e}");
            }
            let _ = writeln!(std::io::stderr().lock(), "skipped: no wgpu adapter ({e})");
            None
        }
        Err(e) => panic!("wgpu backend failed to start: {e}"),
    }
}

fn one(label: &str, kernel: Kernel) -> Vec<Launch> {
    vec![Launch { label: label.into(), kernel }]
}

/// The message of a refused launch list; it must be an internal error naming the launch.
fn refused(table: &BufferTable, launches: &[Launch]) -> String {
    let e = validate(table, launches).expect_err("validate accepted a broken launch");
    assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&launches[0].label), "does not name the launch: {msg}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
    msg
}

#[test]
fn validate_refuses_every_kind_of_broken_launch_once_for_all_backends() {
    let mut t = BufferTable::default();
    let a = t.add("a", 100, DType::F32, Role::Activation);
    let b = t.add("b", 100, DType::F32, Role::Activation);
    let ids = t.add("ids", 10, DType::I32, Role::Tokens);
    let half = t.add("half", 100, DType::F16, Role::Activation);
    let v = |buf, offset, len| View { buf, offset, len };

    let ok = one("ok", Kernel::GeluForward { out: v(a, 0, 50), inp: v(a, 50, 50), n: 50 });
    validate(&t, &ok).unwrap();

    let m = refused(&t, &one("past.end", Kernel::GeluForward { out: v(a, 60, 50), inp: v(b, 0, 50), n: 50 }));
    assert!(m.contains("exceeds buffer 'a'"), "{m}");
    let m = refused(&t, &one("too.short", Kernel::GeluForward { out: v(a, 0, 40), inp: v(b, 0, 50), n: 50 }));
    assert!(m.contains("out") && m.contains("needs 50"), "{m}");
    let m = refused(&t, &one("unknown", Kernel::Zero { out: v(wgpt::graph::BufId(99), 0, 1) }));
    assert!(m.contains("unknown buffer"), "{m}");
    let m = refused(&t, &one("ids.as.floats", Kernel::GeluForward { out: v(a, 0, 10), inp: v(ids, 0, 10), n: 10 }));
    assert!(m.contains("'ids' is i32"), "{m}");
    let m = refused(&t, &one("floats.as.ids", Kernel::EncoderForward {
        out: v(a, 0, 8), tokens: v(b, 0, 2), wte: v(b, 0, 16), wpe: v(b, 16, 16), b: 1, t: 2, c: 4,
    }));
    assert!(m.contains("tokens must be i32"), "{m}");
    // one launch has one precision: an f16 input to an f32 output is refused whatever the backend
    let m = refused(&t, &one("f16.gelu", Kernel::GeluForward { out: v(a, 0, 10), inp: v(half, 0, 10), n: 10 }));
    assert!(m.contains("inp ('half') is f16 but the launch's precision is f32"), "{m}");
    // an all-f16 launch is a valid graph (which backends have f16 kernels is theirs to say)
    validate(&t, &one("f16.gelu.ok", Kernel::GeluForward { out: v(half, 0, 10), inp: v(half, 50, 10), n: 10 })).unwrap();
    // f32 master weights go with low-precision parameters only
    let hyper = t.add("hyper", Scalars::LEN, DType::F32, Role::Scalars);
    let adam = |param, master| Kernel::AdamW {
        param, master: Some(master), grad: param, m: v(b, 0, 10), v: v(b, 10, 10), hyper: v(hyper, 0, Scalars::LEN), weight_decay: 0.0,
    };
    let m = refused(&t, &one("master.f32", adam(v(a, 0, 10), v(a, 20, 10))));
    assert!(m.contains("master weights are for low-precision parameters"), "{m}");
    let m = refused(&t, &one("master.f16", adam(v(half, 0, 10), v(half, 20, 10))));
    assert!(m.contains("master must be f32"), "{m}");
    let m = refused(&t, &one("overlap", Kernel::LayerNormForward {
        out: v(a, 0, 8), mean: v(b, 0, 2), rstd: v(b, 1, 2), inp: v(a, 20, 8), weight: v(a, 40, 4), bias: v(a, 50, 4), n: 2, c: 4,
    }));
    assert!(m.contains("mean and rstd overlap"), "{m}");
    let m = refused(&t, &one("heads", Kernel::AttentionForward { out: v(a, 0, 10), lse: v(b, 0, 6), qkv: v(b, 0, 30), b: 1, t: 2, c: 5, nh: 3 }));
    assert!(m.contains("not a multiple of heads"), "{m}");
    let m = refused(&t, &one("vocab", Kernel::CrossEntropy {
        logits: v(a, 0, 8), losses: v(b, 0, 2), targets: v(ids, 0, 2), dloss: v(b, 10, 1), n: 2, v: 5, vp: 4, write_grad: false,
        accumulate: false,
    }));
    assert!(m.contains("vocab 5"), "{m}");
    // the loss seed is a device scalar view: it must exist
    let m = refused(&t, &one("seed", Kernel::CrossEntropy {
        logits: v(a, 0, 8), losses: v(b, 0, 2), targets: v(ids, 0, 2), dloss: v(b, 0, 0), n: 2, v: 4, vp: 4, write_grad: true,
        accumulate: false,
    }));
    assert!(m.contains("dloss") && m.contains("needs 1"), "{m}");

    // the same refusal comes from every backend's prepare, before anything runs
    let bad = one("past.end", Kernel::GeluForward { out: v(a, 60, 50), inp: v(b, 0, 50), n: 50 });
    let mut cpu_t = BufferTable::default();
    let a2 = cpu_t.add("a", 100, DType::F32, Role::Activation);
    let b2 = cpu_t.add("b", 100, DType::F32, Role::Activation);
    assert_eq!((a2, b2), (a, b));
    let mut cpu = CpuBackend::new(Some(1)).unwrap();
    cpu.alloc(&cpu_t).unwrap();
    let e = cpu.prepare(&bad).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal);
    if let Some(mut g) = gpu() {
        g.alloc(&cpu_t).unwrap();
        assert_eq!(g.prepare(&bad).unwrap_err().to_string(), e.to_string(), "wgpu and cpu disagree on the contract");
    }
}

#[test]
fn every_phase_of_the_gpt2_graphs_validates() {
    let (cfg, _, st) = tiny();
    for g in [build_train_step(&cfg, &opts(st.b, st.t)), build_forward(&cfg, 1, st.t)] {
        for (phase, launches) in g.iter_phases() {
            validate(&g.buffers, launches).unwrap_or_else(|e| panic!("{phase:?}: {e}"));
        }
    }
    let g = build_train_step(&cfg, &opts(st.b, st.t));
    let names: Vec<Phase> = g.iter_phases().map(|(p, _)| p).collect();
    assert_eq!(names, [Phase::ZeroGrad, Phase::Train, Phase::GradNorm, Phase::Update, Phase::Eval]);
    assert!(g.phase(Phase::ReduceGrads).is_empty(), "one device: nothing to reduce");
    assert!(g.phase(Phase::Update).iter().all(|l| matches!(l.kernel, Kernel::AdamW { .. })));
}

#[test]
fn dtypes_have_true_sizes_and_backends_refuse_what_they_lack() {
    assert_eq!([DType::F32, DType::F16, DType::BF16, DType::I32].map(|d| d.size()), [4, 2, 2, 4]);
    let mut t = BufferTable::default();
    let w = t.add("w16", 7, DType::F16, Role::Param(0));
    assert_eq!(t.get(w).bytes(), 14);
    assert_eq!(t.total_bytes(), 14);
    let mut tb = BufferTable::default();
    tb.add("wbf16", 7, DType::BF16, Role::Param(0));
    let mut backends: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::new(Some(1)).unwrap())];
    if let Some(g) = gpu() {
        backends.push(Box::new(g));
    }
    for be in backends.iter_mut() {
        assert!(be.supports(DType::F32) && be.supports(DType::I32));
        if be.supports(DType::BF16) {
            // the cpu reference: bf16 values round-trip, rounded to nearest bf16
            be.alloc(&tb).unwrap();
            let x = [1.0f32, 0.1, -3.5, 3.0e38, 1e-30, 2049.0, -0.60351574];
            be.upload_f32(BufId(0), &x).unwrap();
            let want: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
            assert_eq!(be.download_f32(BufId(0)).unwrap(), want, "{}", be.name());
        } else {
            // a backend without bf16 storage: refused at alloc, naming the buffer
            let e = be.alloc(&tb).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Unsupported { .. }) && msg.contains("bf16") && msg.contains("wbf16"), "{}: {msg}", be.name());
            assert_eq!(e.kind(), ErrorKind::Device);
        }
        // f16 buffers (the weights of f16 inference) round-trip through the f32 helpers, rounded to f16
        if be.supports(DType::F16) {
            be.alloc(&t).unwrap();
            let x = [1.0f32, 0.1, -3.5, 65504.0, 1e-8, 2049.0, 0.333];
            be.upload_f32(w, &x).unwrap();
            let back = be.download_f32(w).unwrap();
            let want: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            assert_eq!(back, want, "{}", be.name());
            assert_eq!(be.download(t.view(w)).unwrap().len(), 14, "{}: 2 bytes per f16 element", be.name());
        }
    }
}

#[test]
fn transfers_move_bytes_and_the_typed_helpers_check_the_table() {
    let mut t = BufferTable::default();
    let f = t.add("f", 5, DType::F32, Role::Activation);
    let i = t.add("i", 3, DType::I32, Role::Tokens);
    let mut backends: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::new(Some(1)).unwrap())];
    if let Some(g) = gpu() {
        backends.push(Box::new(g));
    }
    for be in backends.iter_mut() {
        be.alloc(&t).unwrap();
        let x = [1.5f32, -2.0, 3.25, 0.0, 7.0];
        be.upload(f, bytemuck::cast_slice(&x)).unwrap();
        assert_eq!(be.download_f32(f).unwrap(), x);
        assert_eq!(be.download(View { buf: f, offset: 1, len: 2 }).unwrap(), bytemuck::cast_slice::<f32, u8>(&x[1..3]));
        be.upload_i32(i, &[4, 5, 6]).unwrap();
        assert_eq!(be.download_i32(i).unwrap(), [4, 5, 6]);
        assert!(be.upload(f, &[0u8; 19]).is_err(), "wrong byte count");
        assert!(be.upload_f32(i, &[0.0; 3]).is_err(), "f32 into an i32 buffer");
        assert!(be.download_i32(f).is_err(), "i32 out of an f32 buffer");
        assert!(be.download(View { buf: f, offset: 4, len: 2 }).is_err(), "past the end");
        match be.raw_buffer(f).unwrap() {
            RawBuffer::Host(bytes) => assert_eq!(bytes, bytemuck::cast_slice::<f32, u8>(&x)),
            RawBuffer::Staged => assert!(be.name().starts_with("wgpu")),
            RawBuffer::Cuda { .. } => unreachable!(),
        }
    }
}

/// The loss seed is read from the device scalars: changing it replays the same prepared phases
/// (no rebuild) and scales every gradient by exactly the factor (a power of two).
fn seed_scales_gradients(be: Box<dyn Backend>) {
    let (cfg, params, st) = tiny();
    let mut s = Session::new(be, build_train_step(&cfg, &opts(st.b, st.t))).unwrap();
    s.upload_params(&params).unwrap();
    s.zero_grad().unwrap();
    let l1 = s.train_micro(&st.x, &st.y).unwrap();
    let g1 = s.download_grads().unwrap();
    let seed = 1.0 / (st.b * st.t) as f32;
    s.set_loss_seed(4.0 * seed).unwrap();
    s.zero_grad().unwrap();
    let l4 = s.train_micro(&st.x, &st.y).unwrap();
    let g4 = s.download_grads().unwrap();
    assert_eq!(l1, l4, "the seed scales gradients, not the loss");
    let name = s.backend.name();
    assert!(g1.iter().any(|&x| x != 0.0));
    for (k, (a, b)) in g1.iter().zip(&g4).enumerate() {
        assert_eq!(4.0 * a, *b, "{name}: gradient {k} did not scale by 4 with the seed");
    }
}

#[test]
fn loss_seed_is_a_device_scalar_cpu() {
    seed_scales_gradients(Box::new(CpuBackend::new(None).unwrap()));
}

#[test]
fn loss_seed_is_a_device_scalar_wgpu() {
    if let Some(g) = gpu() {
        seed_scales_gradients(Box::new(g));
    }
}

/// Token ids are checked once, when a batch is uploaded, on every backend (wgpu used to keep the
/// previous step's row for an id past the vocabulary).
#[test]
fn token_ids_are_checked_at_upload() {
    let (cfg, params, st) = tiny();
    let mut backends: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::new(Some(1)).unwrap())];
    if let Some(g) = gpu() {
        backends.push(Box::new(g));
    }
    for be in backends {
        let mut s = Session::new(be, build_forward(&cfg, st.b, st.t)).unwrap();
        s.upload_params(&params).unwrap();
        let mut x = st.x.clone();
        x[7] = cfg.v as i32;
        let e = s.eval(&x, &st.y).unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.kind(), ErrorKind::User, "{msg}");
        assert!(msg.contains(&format!("input token {} at batch position 7", cfg.v)), "{msg}");
        let mut y = st.y.clone();
        y[3] = -1;
        let msg = s.eval(&st.x, &y).unwrap_err().to_string();
        assert!(msg.contains("target token -1 at batch position 3"), "{msg}");
        // and a good batch still runs
        assert!(s.eval(&st.x, &st.y).unwrap().is_finite());
    }
}

/// Several backends in one process, each on its own thread (`Backend: Send`), sharing one wgpu
/// instance: two cpu sessions and two wgpu sessions train the fixture at once and agree with a
/// session that ran alone.
#[test]
fn several_backends_in_one_process_on_their_own_threads() {
    let (cfg, params, st) = tiny();
    let run = move |be: Box<dyn Backend>| {
        let (cfg, params, st) = (cfg, params.clone(), st.clone());
        std::thread::spawn(move || {
            let mut s = Session::new(be, build_train_step(&cfg, &opts(st.b, st.t))).unwrap();
            s.upload_params(&params).unwrap();
            let adam = AdamConsts { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
            (1..=3)
                .map(|step| {
                    s.zero_grad().unwrap();
                    let l = s.train_micro(&st.x, &st.y).unwrap();
                    s.update(1e-3, adam, step).unwrap();
                    l
                })
                .collect::<Vec<f32>>()
        })
    };
    let alone = run(Box::new(CpuBackend::new(Some(1)).unwrap())).join().unwrap();
    let mut handles = vec![run(Box::new(CpuBackend::new(Some(1)).unwrap())), run(Box::new(CpuBackend::new(Some(1)).unwrap()))];
    let gpus: Vec<WgpuBackend> = (0..2).filter_map(|_| gpu()).collect();
    let n_gpu = gpus.len();
    handles.extend(gpus.into_iter().map(|g| run(Box::new(g))));
    let results: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for r in &results[..2] {
        assert_eq!(*r, alone, "cpu sessions on threads differ from one alone");
    }
    for r in &results[2..] {
        for (a, b) in r.iter().zip(&alone) {
            assert!((a - b).abs() < 2e-4, "wgpu session on a thread: {r:?} vs cpu {alone:?}");
        }
    }
    if n_gpu == 2 {
        assert_eq!(results[2], results[3], "two wgpu sessions on the same adapter disagree");
    }
}

#[test]
fn errors_say_who_can_fix_them() {
    assert_eq!(Error::flag("--batch", "x").kind(), ErrorKind::User);
    assert_eq!(Error::format("f.bin", "bad magic").kind(), ErrorKind::User);
    assert_eq!(Error::Data("token".into()).kind(), ErrorKind::User);
    assert_eq!(Error::Unavailable("no driver".into()).kind(), ErrorKind::Device);
    assert_eq!(Error::OutOfMemory("oom".into()).kind(), ErrorKind::Device);
    assert_eq!(Error::backend("wgpu", "lost").kind(), ErrorKind::Device);
    assert_eq!(Error::Internal("bug".into()).kind(), ErrorKind::Internal);
    // scalars slots are distinct and inside the buffer
    let slots = [
        Scalars::LR, Scalars::BETA1, Scalars::BETA2, Scalars::EPS, Scalars::BC1, Scalars::BC2, Scalars::GRAD_SCALE,
        Scalars::GRAD_NORM, Scalars::LOSS_SEED, Scalars::LOSS_SCALE, Scalars::FOUND_INF,
    ];
    let mut sorted = slots.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), slots.len());
    assert!(slots.iter().all(|&s| s < Scalars::LEN));
}

/// `Session::download_grads_range` (a ZeRO-1 rank's share of the gradients, read back for the
/// norm) is exactly that slice of the whole flat gradient, across tensor boundaries.
#[test]
fn a_range_of_the_gradients_is_that_slice_of_all_of_them() {
    let (cfg, params) = read_checkpoint(Path::new("tests/data/tiny/model.bin")).unwrap();
    let opts = TrainOptions { b: 2, t: 8, grad_accum: 1, weight_decay: 0.0, decay_all: false, grad_clip: 0.0, ..Default::default() };
    let mut s = Session::new(Box::new(CpuBackend::new(Some(1)).unwrap()), build_train_step(&cfg, &opts)).unwrap();
    s.upload_params(&params).unwrap();
    let x: Vec<i32> = (0..16).map(|i| (i * 37 % cfg.v) as i32).collect();
    s.train_micro(&x, &x).unwrap();
    let all = s.download_grads().unwrap();
    let n = all.len();
    for r in [0..n, 0..1, n / 3..2 * n / 3, n - 5..n, 7..7] {
        assert_eq!(s.download_grads_range(r.clone()).unwrap(), all[r.clone()].to_vec(), "{r:?}");
    }
}

#[test]
fn a_backend_refuses_a_precision_it_has_no_kernels_for_in_one_line() {
    // a mixed-precision step: the cpu reference and CUDA have every precision; wgpu has f32
    // kernels only (f16 weights of inference aside), and says so when the phases are prepared
    let cfg = Config { max_t: 16, v: 50, vp: 64, l: 1, nh: 2, c: 16 };
    for precision in [DType::F16, DType::BF16] {
        let o = TrainOptions { b: 2, t: 8, precision, ..Default::default() };
        let g = build_train_step(&cfg, &o);
        assert!(g.buffers.iter().any(|(_, d)| d.role == Role::Master(0) && d.dtype == DType::F32), "f32 master weights");
        assert!(g.buffers.iter().all(|(_, d)| !matches!(d.role, Role::Param(_) | Role::Grad(_)) || d.dtype == precision));
        Session::new(Box::new(CpuBackend::new(Some(1)).unwrap()), g.clone()).unwrap();
        if let Some(gpu) = gpu() {
            if gpu.supports(precision) {
                let e = Session::new(Box::new(gpu), g).err().expect("wgpu has no low-precision kernels");
                let msg = e.to_string();
                assert!(msg.contains(&format!("no {precision} kernels")) && msg.contains("--precision fp32") && !msg.contains('\n'), "{msg}");
            }
        }
    }
}
