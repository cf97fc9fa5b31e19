//! The KV-cache decoding checks, for any backend: greedy decoding through the `Prefill`/`Decode`
//! phases must pick the tokens, and give the logits, of the full forward pass (the `Eval` phase
//! over the whole sequence, whose causal attention makes row p the logits that recomputing
//! everything at step p would give). Used by tests/decode.rs (cpu, wgpu) and tests/cuda.rs.

use wgpt::backend::Backend;
use wgpt::graph::{build_decoder, build_forward, DecodeOptions};
use wgpt::infer::{engine, Engine, GenRequest, SamplingParams};
use wgpt::model::Config;
use wgpt::train::session::Session;

/// A 2-layer model with a 256-token context, with logits spread enough that greedy choices are
/// not near-ties (wte scaled up).
pub fn model() -> (Config, Vec<f32>) {
    let cfg = Config { max_t: 256, v: 500, vp: 512, l: 2, nh: 4, c: 64 };
    let mut p = wgpt::model::init::init_params(&cfg, 7);
    let layout = wgpt::model::ParamLayout::new(&cfg);
    for x in &mut p[..layout.sizes[0]] {
        *x *= 40.0;
    }
    for x in &mut p[layout.offsets[1]..layout.offsets[1] + layout.sizes[1]] {
        *x *= 20.0;
    }
    (cfg, p)
}

pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenRequest {
    GenRequest { prompt, max_tokens, sampling: SamplingParams::greedy(), stop: vec![], stop_at_eot: false, logprobs: None }
}

/// The logits of every position of `seq` from the full forward pass (rows of V).
pub fn full_forward_logits(backend: Box<dyn Backend>, cfg: &Config, params: &[f32], seq: &[u32]) -> Vec<Vec<f32>> {
    let t = seq.len();
    let mut sess = Session::new(backend, build_forward(cfg, 1, t)).expect("forward graph");
    sess.upload_params(params).unwrap();
    let x: Vec<i32> = seq.iter().map(|&i| i as i32).collect();
    sess.eval(&x, &vec![0; t]).unwrap();
    (0..t).map(|p| sess.logits_row(p).unwrap()).collect()
}

/// Decodes `prompts` together (greedy, `new_tokens` each) with `slots` slots and prefill chunks of
/// `prefill_rows`; returns each sequence (prompt + generated) and the logits of every decode row
/// that produced a token (the last prompt position onwards).
pub fn decode_together(
    backend: Box<dyn Backend>, cfg: &Config, params: &[f32], opts: DecodeOptions, prompts: &[Vec<u32>], new_tokens: usize,
) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let mut sess = Session::new(backend, build_decoder(cfg, opts)).expect("decoder graph");
    sess.upload_params(params).unwrap();
    // drive the rows directly so the logits of every step can be compared
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    for (slot, p) in prompts.iter().enumerate() {
        let rows: Vec<wgpt::infer::Row> = p[..p.len() - 1].iter().enumerate().map(|(pos, &token)| wgpt::infer::Row { slot, pos, token }).collect();
        wgpt::infer::prefill(&mut sess, &rows).unwrap();
    }
    for _ in 0..new_tokens {
        let rows: Vec<wgpt::infer::Row> = seqs
            .iter()
            .enumerate()
            .map(|(slot, s)| wgpt::infer::Row { slot, pos: s.len() - 1, token: *s.last().unwrap() })
            .collect();
        let out = wgpt::infer::decode(&mut sess, &rows).unwrap();
        for (i, row) in out.chunks(cfg.v).enumerate() {
            seqs[i].push(wgpt::infer::sampler::argmax(row));
            logits[i].push(row.to_vec());
        }
    }
    seqs.into_iter().zip(logits).collect()
}

/// Greedy decoding of `new_tokens` after each prompt (several prompts of different lengths, in one
/// batch) picks the full forward pass's argmax at every step, with logits within `tol`; the
/// engine (continuous batching) gives the same tokens. `make` creates a fresh backend.
pub fn check_greedy_matches_full_forward(make: &dyn Fn() -> Box<dyn Backend>, new_tokens: usize, tol: f32) {
    let (cfg, params) = model();
    // prompt lengths 1, 5 (prefilled by the Decode phase) and 45 (two Prefill chunks + a tail)
    let prompts: Vec<Vec<u32>> = vec![vec![3], (10..15).collect(), (0..45).map(|i| (i * 37 % 500) as u32).collect()];
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    assert!(longest + new_tokens <= cfg.max_t);
    let opts = DecodeOptions { slots: 4, max_t: cfg.max_t, prefill_rows: 16 };
    let got = decode_together(make(), &cfg, &params, opts, &prompts, new_tokens);
    let mut worst = 0f32;
    for (i, (seq, rows)) in got.iter().enumerate() {
        let want = full_forward_logits(make(), &cfg, &params, &seq[..seq.len() - 1]);
        let p0 = prompts[i].len() - 1;
        for (k, row) in rows.iter().enumerate() {
            let w = &want[p0 + k];
            let d = row.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            worst = worst.max(d);
            assert!(d <= tol, "sequence {i}, position {}: logits differ by {d} (tolerance {tol})", p0 + k);
            assert_eq!(
                seq[p0 + k + 1],
                wgpt::infer::sampler::argmax(w),
                "sequence {i}, position {}: the cached decode picked another token than the full forward pass",
                p0 + k
            );
        }
    }
    eprintln!("greedy decode of {new_tokens} tokens x {} sequences: worst logit difference {worst:.2e}", prompts.len());
    // the engine, with every request joining one by one, gives the same sequences
    let mut sess = Session::new(make(), build_decoder(&cfg, opts)).unwrap();
    sess.upload_params(&params).unwrap();
    let mut eng = Engine::new(sess, None).unwrap();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (tx, rx) = std::sync::mpsc::channel();
            eng.submit(greedy(p.clone(), new_tokens), tx);
            eng.step().unwrap(); // the next request joins a running batch
            rx
        })
        .collect();
    while !eng.is_idle() {
        eng.step().unwrap();
    }
    for (i, rx) in rxs.into_iter().enumerate() {
        let ids: Vec<u32> = rx.try_iter().filter_map(|e| if let engine::Event::Token(t) = e { Some(t.id) } else { None }).collect();
        assert_eq!(ids, got[i].0[prompts[i].len()..], "engine sequence {i}");
    }
}

/// f16 weights against f32 weights on the tiny fixture (L=2, C=64, V=500, maxT=64): greedy
/// decoding of `steps` tokens after a 3-token prompt gives the same tokens, and every step's
/// logits are within `tol` of the f32 ones. Returns the worst logit difference.
pub fn check_f16_weights_match_f32(make: &dyn Fn() -> Box<dyn Backend>, steps: usize, tol: f32) -> f32 {
    use wgpt::graph::{build_decoder_with, DType};
    let (cfg, params) = wgpt::model::checkpoint::read_checkpoint(std::path::Path::new("tests/data/tiny/model.bin")).unwrap();
    let prompt: Vec<u32> = vec![11, 222, 333];
    assert!(prompt.len() + steps <= cfg.max_t);
    let opts = DecodeOptions { slots: 2, max_t: cfg.max_t, prefill_rows: 8 };
    let run = |dtype: DType| -> (Vec<u32>, Vec<Vec<f32>>) {
        let mut sess = Session::new(make(), build_decoder_with(&cfg, opts, dtype)).expect("decoder graph");
        sess.upload_params(&params).unwrap();
        let rows: Vec<wgpt::infer::Row> =
            prompt[..prompt.len() - 1].iter().enumerate().map(|(pos, &token)| wgpt::infer::Row { slot: 1, pos, token }).collect();
        wgpt::infer::prefill(&mut sess, &rows).unwrap();
        let mut seq = prompt.clone();
        let mut logits = Vec::new();
        for _ in 0..steps {
            let row = wgpt::infer::Row { slot: 1, pos: seq.len() - 1, token: *seq.last().unwrap() };
            let out = wgpt::infer::decode(&mut sess, &[row]).unwrap();
            seq.push(wgpt::infer::sampler::argmax(&out));
            logits.push(out);
        }
        (seq, logits)
    };
    let (s32, l32) = run(DType::F32);
    let (s16, l16) = run(DType::F16);
    let mut worst = 0f32;
    for (k, (a, b)) in l32.iter().zip(&l16).enumerate() {
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
        assert!(d <= tol, "step {k}: f16-weight logits differ from f32 by {d} (tolerance {tol})");
    }
    assert_eq!(s16, s32, "f16 weights changed the greedy tokens");
    worst
}
