//! `wgpt serve`: an OpenAI-compatible HTTP server over the generation engine.
//!
//! * one engine thread owns the model (a [`Session`] with the decoding phases) and runs
//!   [`Engine`]'s continuous batching: every request of every connection goes to it through one
//!   channel, and requests that arrive while others decode join them between decode steps, up
//!   to `--max-batch` sequences;
//! * each connection has a thread of its own (`http.rs`); its handler checks a request
//!   (`api.rs`), submits one engine request per choice and waits for their events, then answers
//!   with the whole completion or streams it as server-sent events;
//! * a handler that stops listening (the client disconnected, a write failed) drops its
//!   receivers, and the engine frees those slots at its next step; a panicking handler answers
//!   500 (or closes its connection) and the server goes on.
//!
//! Endpoints: `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
//! `GET /metrics`; `POST /v1/chat/completions` is a 400 (GPT-2 has no chat template).

pub mod api;
mod http;

use crate::backend::BackendArgs;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::infer::engine::{Engine, Event, GenRequest};
use crate::train::session::Session;
use api::{ApiError, Choice, CompletionRequest, Meta};
use http::{Request, Responder};
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// model: an llm.c checkpoint (.bin), or a Hugging Face GPT-2 folder or model.safetensors
    #[arg(long)]
    pub model: PathBuf,
    /// address to listen on (0.0.0.0 or :: = every interface)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// port to listen on; 0 picks a free one (the line printed at the start names it)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// require `Authorization: Bearer KEY` on every /v1/ endpoint [default: no key]
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// sequences decoded together (KV-cache slots); further requests wait for a free slot
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_batch: usize,
    /// positions per sequence, prompt + completion [default: the model's maxT]
    #[arg(long, value_name = "N")]
    pub max_seq_len: Option<usize>,
    /// the model's id in the API (`model` in requests, /v1/models) [default: --model as given]
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// A request for the engine thread: what to generate and where its events go.
type Job = (GenRequest, Sender<Event>);

/// What the engine thread publishes after each step, and the handlers' counts (`GET /metrics`).
struct Stats {
    running: AtomicUsize,
    running_max: AtomicUsize,
    slots: usize,
    /// sequences given up because their client went away (a failed write, a closed connection)
    cancelled: AtomicUsize,
}

/// What every handler shares.
struct State {
    model: api::Model,
    tok: Tokenizer,
    api_key: Option<String>,
    submit: Sender<Job>,
    stats: Arc<Stats>,
    /// `created` of /v1/models: when the server started
    started: u64,
}

fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A random u64 (std's randomly keyed hasher over the time and a counter): seeds of requests
/// without one, and response ids.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

pub fn run(a: &ServeArgs) -> Result<()> {
    if a.max_batch == 0 {
        return Err(Error::flag("--max-batch", "must be at least 1"));
    }
    if a.served_model_name.as_deref() == Some("") {
        return Err(Error::flag("--served-model-name", "must not be empty"));
    }
    let (cfg, params) = crate::model::hf::load_model(&a.model)?;
    let max_t = a.max_seq_len.unwrap_or(cfg.max_t);
    if max_t < 2 || max_t > cfg.max_t {
        return Err(Error::flag("--max-seq-len", format!("{max_t} must be in 2..={} (the model's maxT)", cfg.max_t)));
    }
    let tok = Tokenizer::gpt2()?;
    let name = a.served_model_name.clone().unwrap_or_else(|| a.model.display().to_string());
    let model = api::Model { name: name.clone(), max_t, vocab: cfg.v, eot: tok.eot().min(cfg.v as u32 - 1) };

    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(a.host.as_str(), a.port))
        .map_err(|e| Error::flag("--host", format!("'{}' is not an address to listen on: {e}", a.host)))?
        .collect();
    let listener = std::net::TcpListener::bind(&addrs[..])
        .map_err(|e| Error::flag("--port", format!("cannot listen on {}:{}: {e}", a.host, a.port)))?;
    let addr = listener.local_addr().map_or_else(|_| format!("{}:{}", a.host, a.port), |ip| ip.to_string());

    // the engine thread creates the backend and the session itself (a device context then
    // belongs to the thread that uses it), and says when it is ready
    let stats = Arc::new(Stats {
        running: AtomicUsize::new(0),
        running_max: AtomicUsize::new(0),
        slots: a.max_batch,
        cancelled: AtomicUsize::new(0),
    });
    let (submit, jobs) = mpsc::channel::<Job>();
    let (ready_tx, ready) = mpsc::channel::<Result<String>>();
    let (backend_args, engine_tok, engine_stats) = (a.backend.clone(), tok.clone(), stats.clone());
    let opts = crate::graph::DecodeOptions { slots: a.max_batch, max_t, prefill_rows: max_t.min(64) };
    std::thread::Builder::new()
        .name("wgpt-engine".into())
        .spawn(move || {
            let started = (|| {
                let backend = backend_args.create()?;
                let name = backend.name();
                let mut sess = Session::new(backend, crate::graph::build_decoder(&cfg, opts))?;
                sess.upload_params(&params)?;
                drop(params);
                Ok((Engine::new(sess, Some(engine_tok))?, name))
            })();
            match started {
                Ok((engine, name)) => {
                    let _ = ready_tx.send(Ok(name));
                    engine_loop(engine, jobs, &engine_stats);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| Error::Internal(format!("starting the engine thread: {e}")))?;
    let backend_name = ready.recv().map_err(|_| Error::Internal("the engine thread stopped while starting".into()))??;

    println!("wgpt serve: listening on http://{addr} (model {name}, backend {backend_name}, {} slots, context {max_t})", a.max_batch);
    let _ = std::io::stdout().flush();

    let state = State { model, tok, api_key: a.api_key.clone(), submit, stats, started: unix_time() };
    let e = http::serve(listener, Arc::new(move |rq: &Request, out: &mut Responder| route(&state, rq, out)));
    Err(Error::Unavailable(format!("wgpt serve: listening on {addr} failed: {e}")))
}

/// The engine thread: `Engine::serve`'s loop, publishing how many sequences run after each step.
fn engine_loop(mut engine: Engine<Session>, jobs: Receiver<Job>, stats: &Stats) {
    let mut open = true;
    while open || !engine.is_idle() {
        if engine.is_idle() {
            match jobs.recv() {
                Ok((req, tx)) => engine.submit(req, tx),
                Err(_) => break,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok((req, tx)) => engine.submit(req, tx),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // a failed step has answered every request with Event::Error; the next ones may work
        if let Err(e) = engine.step() {
            eprintln!("wgpt serve: generation step failed: {e}");
        }
        let n = engine.running();
        stats.running.store(n, Ordering::Relaxed);
        stats.running_max.fetch_max(n, Ordering::Relaxed);
    }
}

fn not_found(out: &mut Responder, path: &str) {
    out.error(&ApiError::new(404, "invalid_request_error", "not_found", None, format!("no such endpoint: {path}")));
}

fn not_allowed(out: &mut Responder, rq: &Request, allow: &'static str) {
    let e = ApiError::new(
        405,
        "invalid_request_error",
        "method_not_allowed",
        None,
        format!("{} {} is not supported; use {allow}", rq.method, rq.path()),
    );
    out.json(405, &e.body(), &[("Allow", allow)]);
}

fn route(st: &State, rq: &Request, out: &mut Responder) {
    let path = rq.path();
    let get = rq.method == "GET" || rq.method == "HEAD";
    let post = rq.method == "POST";
    match path {
        "/health" if get => out.send(200, "text/plain", b"", &[]),
        "/health" => not_allowed(out, rq, "GET"),
        "/metrics" if get => out.send(200, "text/plain; version=0.0.4", metrics(&st.stats).as_bytes(), &[]),
        "/metrics" => not_allowed(out, rq, "GET"),
        p if p == "/v1" || p.starts_with("/v1/") => {
            if let Err(e) = authorize(st, rq) {
                return out.error(&e);
            }
            match p {
                "/v1/completions" if post => completions(st, rq, out),
                "/v1/completions" => not_allowed(out, rq, "POST"),
                "/v1/chat/completions" if post => out.error(&ApiError::new(
                    400,
                    "invalid_request_error",
                    "chat_template_missing",
                    None,
                    "GPT-2 has no chat template, so this server has no chat completions; use POST /v1/completions with a text prompt",
                )),
                "/v1/chat/completions" => not_allowed(out, rq, "POST"),
                "/v1/models" if get => out.json(200, &api::models_json(&st.model, st.started), &[]),
                "/v1/models" => not_allowed(out, rq, "GET"),
                p if p.starts_with("/v1/models/") => {
                    let id = percent_decode(&p["/v1/models/".len()..]);
                    if !get {
                        not_allowed(out, rq, "GET")
                    } else if id == st.model.name {
                        out.json(200, &api::model_json(&st.model, st.started), &[])
                    } else {
                        out.error(&api::check_model(Some(&Value::String(id)), &st.model.name).expect_err("another name"))
                    }
                }
                _ => not_found(out, path),
            }
        }
        _ => not_found(out, path),
    }
}

/// `%XX` escapes of a path segment (a model id may hold `/`, sent as `%2F`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(b.len()), 0);
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// With --api-key: `Authorization: Bearer KEY` (compared in constant time).
fn authorize(st: &State, rq: &Request) -> std::result::Result<(), ApiError> {
    let Some(key) = &st.api_key else { return Ok(()) };
    let given = rq.header("Authorization");
    let token = given.and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))).map(str::trim);
    let ok = token.is_some_and(|t| t.len() == key.len() && t.bytes().zip(key.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0);
    if ok {
        return Ok(());
    }
    let msg = if given.is_none() { "missing API key: send Authorization: Bearer <key>" } else { "incorrect API key" };
    Err(ApiError::new(401, "authentication_error", "invalid_api_key", None, msg))
}

fn metrics(s: &Stats) -> String {
    let mut out = String::new();
    for (name, kind, help, v) in [
        ("wgpt_requests_running", "gauge", "Sequences in the engine's slots now.", s.running.load(Ordering::Relaxed)),
        (
            "wgpt_requests_running_max",
            "gauge",
            "The most sequences in the slots at once since the start.",
            s.running_max.load(Ordering::Relaxed),
        ),
        ("wgpt_slots", "gauge", "Sequences decoded together at most (--max-batch).", s.slots),
        (
            "wgpt_requests_cancelled_total",
            "counter",
            "Sequences given up because their client went away.",
            s.cancelled.load(Ordering::Relaxed),
        ),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    }
    out
}

fn engine_gone() -> ApiError {
    ApiError::server(503, "the generation engine has stopped")
}

/// Submits one engine request per choice; their events come back tagged with the choice index.
/// Each choice's events are forwarded by a small thread, which ends (dropping the engine's
/// receiver, so the engine frees the slot) when the handler's receiver is gone.
fn start(st: &State, req: &CompletionRequest) -> std::result::Result<Receiver<(usize, Event)>, ApiError> {
    let (tx, rx) = mpsc::channel();
    for (i, g) in req.gen_requests(random_u64).into_iter().enumerate() {
        let (etx, erx) = mpsc::channel::<Event>();
        st.submit.send((g, etx)).map_err(|_| engine_gone())?;
        let (tx, stats) = (tx.clone(), st.stats.clone());
        std::thread::Builder::new()
            .name("wgpt-choice".into())
            .spawn(move || {
                for ev in erx {
                    let last = !matches!(ev, Event::Token(_));
                    if tx.send((i, ev)).is_err() {
                        if !last {
                            stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    if last {
                        break;
                    }
                }
            })
            .map_err(|e| ApiError::server(503, format!("cannot start a thread: {e}")))?;
    }
    Ok(rx)
}

fn completions(st: &State, rq: &Request, out: &mut Responder) {
    let req = match CompletionRequest::parse(&rq.body, &st.model, &st.tok) {
        Ok(r) => r,
        Err(e) => return out.error(&e),
    };
    let meta = Meta { id: format!("cmpl-{:016x}{:016x}", random_u64(), random_u64()), created: unix_time(), model: st.model.name.clone() };
    let events = match start(st, &req) {
        Ok(rx) => rx,
        Err(e) => return out.error(&e),
    };
    if req.stream {
        stream(st, out, &req, &meta, events);
    } else {
        whole(st, out, &req, &meta, events);
    }
}

/// How often a handler waiting for a whole completion looks whether its client is still there.
const CLIENT_CHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// Waits for every choice, then answers with the whole completion. A client that disconnects
/// meanwhile is noticed within [`CLIENT_CHECK`]: returning drops `events`, which frees the slots.
fn whole(st: &State, out: &mut Responder, req: &CompletionRequest, meta: &Meta, events: Receiver<(usize, Event)>) {
    let mut choices = vec![Choice::default(); req.prompts.len() * req.n];
    let mut left = choices.len();
    let mut checked = std::time::Instant::now();
    while left > 0 {
        let ev = events.recv_timeout(CLIENT_CHECK);
        if checked.elapsed() >= CLIENT_CHECK {
            // (a client that half-closes its side after the request counts as gone too)
            if out.client_gone() {
                return;
            }
            checked = std::time::Instant::now();
        }
        match ev {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok((i, Event::Token(t))) => choices[i].token(t),
            Ok((i, Event::Done { reason, tail, completion_tokens, .. })) => {
                choices[i].done(reason, &tail, completion_tokens, st.tok.eot());
                left -= 1;
            }
            Ok((_, Event::Error(m))) => return out.error(&ApiError::server(500, format!("generation failed: {m}"))),
            Err(mpsc::RecvTimeoutError::Disconnected) => return out.error(&engine_gone()),
        }
    }
    out.json(200, &api::completion_json(meta, req, &choices, &st.tok), &[]);
}

/// Streams the choices as server-sent events. Returns at the first failed write: dropping
/// `events` then frees the engine's slots.
fn stream(st: &State, out: &mut Responder, req: &CompletionRequest, meta: &Meta, events: Receiver<(usize, Event)>) {
    let Ok(mut sse) = out.sse() else { return };
    let usage = req.include_usage.then_some(Value::Null);
    let k = req.prompts.len() * req.n;
    let (mut first, mut offsets, mut seen) = (vec![true; k], vec![0usize; k], vec![0usize; k]);
    let mut completion_tokens = 0;
    let send = |sse: &mut http::Sse, i: usize, mut choice: Value, ids: &[u32], first: &mut [bool]| {
        if req.return_token_ids {
            choice["token_ids"] = json!(ids);
            if std::mem::take(&mut first[i]) {
                choice["prompt_token_ids"] = json!(req.prompt_of(i).ids);
            }
        }
        sse.send(&api::chunk_json(meta, vec![choice], usage.clone()).to_string())
    };
    if req.echo {
        for (i, offset) in offsets.iter_mut().enumerate() {
            let text = &req.prompt_of(i).text;
            *offset = text.chars().count();
            if send(&mut sse, i, api::choice_delta(i, text, None, None), &[], &mut first).is_err() {
                return;
            }
        }
    }
    let mut left = k;
    while left > 0 {
        let (i, ev) = match events.recv() {
            Ok(x) => x,
            Err(_) => {
                let _ = sse.send(&engine_gone().body().to_string());
                break;
            }
        };
        let sent = match ev {
            Event::Token(t) => {
                seen[i] += 1;
                if t.text.is_empty() && req.logprobs.is_none() && !req.return_token_ids {
                    continue; // nothing to tell yet (text held back)
                }
                let lp = t.logprob.map(|lp| {
                    let (v, end) = api::logprobs_json(&st.tok, &[t.id], &[lp], offsets[i]);
                    offsets[i] = end;
                    v
                });
                send(&mut sse, i, api::choice_delta(i, &t.text, lp, None), &[t.id], &mut first)
            }
            Event::Done { reason, tail, completion_tokens: n, .. } => {
                left -= 1;
                completion_tokens += n;
                // the engine sends no Token for a final <|endoftext|> (see Choice::done)
                let eot = [st.tok.eot()];
                let ids: &[u32] = if n > seen[i] { &eot } else { &[] };
                send(&mut sse, i, api::choice_delta(i, &tail, None, Some(reason)), ids, &mut first)
            }
            Event::Error(m) => {
                let _ = sse.send(&ApiError::server(500, format!("generation failed: {m}")).body().to_string());
                break;
            }
        };
        if sent.is_err() {
            return;
        }
    }
    if req.include_usage && left == 0 {
        let u = api::usage_json(req.prompt_tokens(), completion_tokens);
        if sse.send(&api::chunk_json(meta, vec![], Some(u)).to_string()).is_err() {
            return;
        }
    }
    if sse.send("[DONE]").is_ok() {
        let _ = sse.end();
    }
}
