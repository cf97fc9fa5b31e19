//! The server of `wgpt serve`: start-up, the engine thread, and the HTTP side on axum + tokio.
//!
//! The engine stays on one std thread that owns the model, fed by a std channel. A handler
//! submits one engine request per choice; each choice's events are relayed from the engine's
//! std channel into one tokio channel per HTTP request by a blocking task ([`relay`]). Whoever
//! answers holds that channel's receiver — the handler future for a whole completion, the
//! response stream for server-sent events — so when hyper drops either (the client closed its
//! connection, a write failed) the relays' next send fails, they drop the engine's receivers,
//! and the engine frees those slots at its next step.

use super::api::{self, ApiError, Choice, CompletionRequest, Meta};
use super::ServeArgs;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::infer::engine::{Engine, Event, GenRequest};
use crate::train::session::Session;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Request bodies larger than this are refused (413).
pub const MAX_BODY: usize = 1 << 20;

/// A request for the engine thread: what to generate and where its events go.
type Job = (GenRequest, Sender<Event>);

/// What the engine thread publishes after each step, and the relays' counts (`GET /metrics`).
struct Stats {
    running: AtomicUsize,
    running_max: AtomicUsize,
    slots: usize,
    /// sequences given up because their client went away (a failed write, a closed connection)
    cancelled: AtomicUsize,
}

/// What every handler shares.
struct Shared {
    model: api::Model,
    tok: Tokenizer,
    api_key: Option<String>,
    submit: Sender<Job>,
    stats: Arc<Stats>,
    /// `created` of /v1/models: when the server started
    started: u64,
}

type St = State<Arc<Shared>>;

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
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
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
    let (backend_args, engine_tok, engine_stats, dtype) = (a.backend.clone(), tok.clone(), stats.clone(), a.dtype);
    let opts = crate::graph::DecodeOptions { slots: a.max_batch, max_t, prefill_rows: max_t.min(64) };
    std::thread::Builder::new()
        .name("wgpt-engine".into())
        .spawn(move || {
            let started = (|| {
                let backend = backend_args.create()?;
                let name = backend.name();
                let weights = crate::infer::weight_dtype(backend.as_ref(), dtype);
                let mut sess = Session::new(backend, crate::graph::build_decoder_with(&cfg, opts, weights))?;
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

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("wgpt-http")
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("starting the tokio runtime: {e}")))?;
    let shared = Shared { model, tok, api_key: a.api_key.clone(), submit, stats, started: unix_time() };
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("wgpt serve: listening on http://{addr} (model {name}, backend {backend_name}, {} slots, context {max_t})", a.max_batch);
        let _ = std::io::stdout().flush();
        serve(listener, app(Router::new(), Arc::new(shared))).await
    });
    let why = served.err().map_or_else(|| "it stopped".to_string(), |e| e.to_string());
    Err(Error::Unavailable(format!("wgpt serve: serving on {addr} failed: {why}")))
}

/// Serves `app` on `listener` (each SSE event goes out at once: no Nagle delay).
async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}

/// The engine thread: `Engine::serve`, publishing how many sequences run after each step.
fn engine_loop(mut engine: Engine<Session>, jobs: Receiver<Job>, stats: &Stats) {
    engine.serve(jobs, |e| {
        let n = e.running();
        stats.running.store(n, Ordering::Relaxed);
        stats.running_max.fetch_max(n, Ordering::Relaxed);
    });
}

// ---- responses ----

fn with_status(status: u16, r: impl IntoResponse) -> Response {
    (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), r).into_response()
}

fn json_response(status: u16, body: &Value) -> Response {
    with_status(status, ([(header::CONTENT_TYPE, "application/json")], body.to_string()))
}

/// An OpenAI error body with its status.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if self.status == 401 {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn invalid_request(status: u16, code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(status, "invalid_request_error", code, None, msg)
}

fn engine_gone() -> ApiError {
    ApiError::server(503, "the generation engine has stopped")
}

/// A panicking handler: 500, and the server goes on (the panic itself is on stderr already).
fn panicked(_: Box<dyn std::any::Any + Send>) -> Response<Body> {
    eprintln!("wgpt serve: a request handler panicked; it was answered 500");
    ApiError::server(500, "internal error: the request handler panicked").into_response()
}

// ---- routing ----

/// The API's routes on `extra` (tests add some), with the key check, the panic guard and the
/// 404/405 answers in OpenAI's shape.
fn app(extra: Router<Arc<Shared>>, st: Arc<Shared>) -> Router {
    // a wrong method: 405 naming the allowed one (axum's own 405 has no body)
    let only = |allow: &'static str, r: MethodRouter<Arc<Shared>>| {
        r.fallback(move |method: Method, uri: Uri| async move {
            let msg = format!("{method} {} is not supported; use {allow}", uri.path());
            let mut r = invalid_request(405, "method_not_allowed", msg).into_response();
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
            r
        })
    };
    extra
        .route("/health", only("GET", get(|| async { ([(header::CONTENT_TYPE, "text/plain")], "") })))
        .route("/metrics", only("GET", get(metrics)))
        .route("/v1/completions", only("POST", post(completions)))
        .route("/v1/chat/completions", only("POST", post(chat)))
        .route("/v1/models", only("GET", get(models)))
        .route("/v1/models/{*id}", only("GET", get(model)))
        .fallback(|uri: Uri| async move { invalid_request(404, "not_found", format!("no such endpoint: {}", uri.path())) })
        .layer(axum::middleware::from_fn_with_state(st.clone(), authorize))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(st)
}

/// With --api-key: `Authorization: Bearer KEY` on every /v1 path (compared in constant time).
async fn authorize(State(st): St, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/v1" || path.starts_with("/v1/") {
        if let Err(e) = check_key(st.api_key.as_deref(), req.headers()) {
            return e.into_response();
        }
    }
    next.run(req).await
}

fn check_key(key: Option<&str>, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let token = given.and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))).map(str::trim);
    let ok = token.is_some_and(|t| t.len() == key.len() && t.bytes().zip(key.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0);
    if ok {
        return Ok(());
    }
    let msg = if given.is_none() { "missing API key: send Authorization: Bearer <key>" } else { "incorrect API key" };
    Err(ApiError::new(401, "authentication_error", "invalid_api_key", None, msg))
}

async fn chat() -> ApiError {
    invalid_request(
        400,
        "chat_template_missing",
        "GPT-2 has no chat template, so this server has no chat completions; use POST /v1/completions with a text prompt",
    )
}

async fn models(State(st): St) -> Response {
    json_response(200, &api::models_json(&st.model, st.started))
}

/// `GET /v1/models/{id}`; the id may hold `/` (sent as is or as `%2F`).
async fn model(State(st): St, id: std::result::Result<Path<String>, PathRejection>) -> Response {
    match id {
        Ok(Path(id)) if id == st.model.name => json_response(200, &api::model_json(&st.model, st.started)),
        Ok(Path(id)) => api::check_model(Some(&Value::String(id)), &st.model.name).expect_err("another name").into_response(),
        Err(e) => invalid_request(400, "invalid_value", format!("bad model id in the path: {}", e.body_text())).into_response(),
    }
}

async fn metrics(State(st): St) -> Response {
    let s = &st.stats;
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

// ---- completions ----

/// The body, at most [`MAX_BODY`] bytes (413 past that, before reading it when its length says so).
async fn read_body(headers: &HeaderMap, mut body: Body) -> std::result::Result<Bytes, ApiError> {
    let too_large =
        |len: String| invalid_request(413, "request_too_large", format!("the request body ({len}) is larger than {MAX_BODY} bytes"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > MAX_BODY as u64) {
        // a client waiting for "100 Continue" sends nothing more; any other is sending the body
        let waits = headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits {
            discard(body);
        }
        return Err(too_large(format!("{n} bytes")));
    }
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| invalid_request(400, "invalid_http", format!("reading the request body failed: {e}")))?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > MAX_BODY {
                discard(body);
                return Err(too_large("more than that".into()));
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.into())
}

/// Reads and drops what the client still sends of a refused body (up to 64 MiB, for 2 s), so it
/// gets to read the 413 instead of a reset on a connection closed with unread data.
fn discard(mut body: Body) {
    tokio::spawn(async move {
        let drain = async {
            let mut left = 64usize << 20;
            while let Some(Ok(frame)) = body.frame().await {
                left = left.saturating_sub(frame.data_ref().map_or(0, |d| d.len()));
                if left == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    });
}

async fn completions(State(st): St, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // a refused body answers with `Connection: close`: the rest of it is not read
    let close = |e: ApiError| {
        let mut r = e.into_response();
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    let body = match read_body(&parts.headers, body).await {
        Ok(b) => b,
        Err(e) if e.status == 413 => return close(e),
        Err(e) => return e.into_response(),
    };
    let req = match CompletionRequest::parse(&body, &st.model, &st.tok) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let meta = Meta { id: format!("cmpl-{:016x}{:016x}", random_u64(), random_u64()), created: unix_time(), model: st.model.name.clone() };
    let events = match start(&st, &req) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    if !req.stream {
        return whole(&st, &req, &meta, events).await;
    }
    let mut r = Sse::new(Streamer::new(st.clone(), req, meta, events).into_stream()).into_response();
    if parts.version < Version::HTTP_11 {
        // no chunked framing on HTTP/1.0: the body ends with the connection
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// How often a relay whose sequence has produced nothing yet (queued for a slot) looks whether
/// its request is still wanted.
const RELAY_CHECK: Duration = Duration::from_millis(50);

/// Submits one engine request per choice; their events come back on one channel, tagged with
/// the choice index.
fn start(st: &Shared, req: &CompletionRequest) -> std::result::Result<UnboundedReceiver<(usize, Event)>, ApiError> {
    let (tx, rx) = unbounded_channel();
    for (i, g) in req.gen_requests(random_u64).into_iter().enumerate() {
        let (etx, erx) = mpsc::channel::<Event>();
        st.submit.send((g, etx)).map_err(|_| engine_gone())?;
        let (tx, stats) = (tx.clone(), st.stats.clone());
        tokio::task::spawn_blocking(move || relay(i, &erx, &tx, &stats));
    }
    Ok(rx)
}

/// Forwards one choice's events from the engine until its last one, or until the answer's
/// receiver is gone: returning drops the engine's receiver, so the engine frees the slot.
fn relay(i: usize, events: &Receiver<Event>, tx: &UnboundedSender<(usize, Event)>, stats: &Stats) {
    loop {
        match events.recv_timeout(RELAY_CHECK) {
            Ok(ev) => {
                let last = !matches!(ev, Event::Token(_));
                if tx.send((i, ev)).is_err() {
                    if !last {
                        stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                if last {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) if tx.is_closed() => {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            // the engine has stopped: the answer sees every relay gone
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Waits for every choice, then answers with the whole completion. If the client disconnects
/// meanwhile, hyper drops this future, and `events` with it.
async fn whole(st: &Shared, req: &CompletionRequest, meta: &Meta, mut events: UnboundedReceiver<(usize, Event)>) -> Response {
    let mut choices = vec![Choice::default(); req.prompts.len() * req.n];
    let mut left = choices.len();
    while left > 0 {
        match events.recv().await {
            Some((i, Event::Token(t))) => choices[i].token(t),
            Some((i, Event::Done { reason, tail, completion_tokens, .. })) => {
                choices[i].done(reason, &tail, completion_tokens, st.tok.eot());
                left -= 1;
            }
            Some((_, Event::Error(m))) => return ApiError::server(500, format!("generation failed: {m}")).into_response(),
            None => return engine_gone().into_response(),
        }
    }
    json_response(200, &api::completion_json(meta, req, &choices, &st.tok))
}

/// The server-sent events of a streamed completion, made from the engine's events as the
/// response body asks for them; dropped with the body (the client has gone), it drops `events`.
struct Streamer {
    st: Arc<Shared>,
    req: CompletionRequest,
    meta: Meta,
    events: UnboundedReceiver<(usize, Event)>,
    /// `data:` payloads made and not yet sent
    queue: VecDeque<String>,
    /// per choice: no chunk sent yet (`prompt_token_ids` goes in the first), the text offset of
    /// the next logprobs, the tokens seen
    first: Vec<bool>,
    offsets: Vec<usize>,
    seen: Vec<usize>,
    completion_tokens: usize,
    /// choices not done yet
    left: usize,
    /// `[DONE]` is queued
    ended: bool,
}

impl Streamer {
    fn new(st: Arc<Shared>, req: CompletionRequest, meta: Meta, events: UnboundedReceiver<(usize, Event)>) -> Streamer {
        let k = req.prompts.len() * req.n;
        let mut s = Streamer {
            st,
            req,
            meta,
            events,
            queue: VecDeque::new(),
            first: vec![true; k],
            offsets: vec![0; k],
            seen: vec![0; k],
            completion_tokens: 0,
            left: k,
            ended: false,
        };
        if s.req.echo {
            for i in 0..k {
                let text = s.req.prompt_of(i).text.clone();
                s.offsets[i] = text.chars().count();
                s.push(i, api::choice_delta(i, &text, None, None), &[]);
            }
        }
        s
    }

    fn into_stream(self) -> impl futures_util::Stream<Item = std::result::Result<sse::Event, std::convert::Infallible>> {
        futures_util::stream::unfold(self, |mut s| async move {
            let data = s.next().await?;
            Some((Ok(sse::Event::default().data(data)), s))
        })
    }

    /// The next event's data; None after `[DONE]`.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(d) = self.queue.pop_front() {
                return Some(d);
            }
            if self.ended {
                return None;
            }
            if self.left == 0 {
                self.end();
                continue;
            }
            match self.events.recv().await {
                Some((i, ev)) => self.on_event(i, ev),
                None => {
                    self.queue.push_back(engine_gone().body().to_string());
                    self.end();
                }
            }
        }
    }

    /// Queues a chunk with one choice.
    fn push(&mut self, i: usize, mut choice: Value, ids: &[u32]) {
        if self.req.return_token_ids {
            choice["token_ids"] = json!(ids);
            if std::mem::take(&mut self.first[i]) {
                choice["prompt_token_ids"] = json!(self.req.prompt_of(i).ids);
            }
        }
        let usage = self.req.include_usage.then_some(Value::Null);
        self.queue.push_back(api::chunk_json(&self.meta, vec![choice], usage).to_string());
    }

    fn on_event(&mut self, i: usize, ev: Event) {
        match ev {
            Event::Token(t) => {
                self.seen[i] += 1;
                if t.text.is_empty() && self.req.logprobs.is_none() && !self.req.return_token_ids {
                    return; // nothing to tell yet (text held back)
                }
                let lp = t.logprob.map(|lp| {
                    let (v, end) = api::logprobs_json(&self.st.tok, &[t.id], &[lp], self.offsets[i]);
                    self.offsets[i] = end;
                    v
                });
                self.push(i, api::choice_delta(i, &t.text, lp, None), &[t.id]);
            }
            Event::Done { reason, tail, completion_tokens: n, .. } => {
                self.left -= 1;
                self.completion_tokens += n;
                // the engine sends no Token for a final <|endoftext|> (see Choice::done)
                let eot = [self.st.tok.eot()];
                let ids: &[u32] = if n > self.seen[i] { &eot } else { &[] };
                self.push(i, api::choice_delta(i, &tail, None, Some(reason)), ids);
            }
            Event::Error(m) => {
                self.queue.push_back(ApiError::server(500, format!("generation failed: {m}")).body().to_string());
                self.end();
            }
        }
    }

    /// Queues the usage chunk (when asked for and every choice is done) and `[DONE]`.
    fn end(&mut self) {
        if self.req.include_usage && self.left == 0 {
            let u = api::usage_json(self.req.prompt_tokens(), self.completion_tokens);
            self.queue.push_back(api::chunk_json(&self.meta, vec![], Some(u)).to_string());
        }
        self.queue.push_back("[DONE]".into());
        self.ended = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::engine::TokenOut;
    use crate::infer::FinishReason;
    use std::io::Read;
    use std::net::{SocketAddr, TcpStream};

    /// How many fake sequences stopped early because their receiver was gone.
    struct Fake {
        stopped: AtomicUsize,
    }

    /// A fake engine: each request gets `max_tokens` tokens "a", one every 10 ms (stopping when
    /// its receiver is gone), then Done.
    fn fake_sequence(req: GenRequest, tx: Sender<Event>, fake: &Fake) {
        for _ in 0..req.max_tokens {
            std::thread::sleep(Duration::from_millis(10));
            if tx.send(Event::Token(TokenOut { id: 64, text: "a".into(), logprob: None })).is_err() {
                fake.stopped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let done = Event::Done {
            reason: FinishReason::Length,
            tail: String::new(),
            prompt_tokens: req.prompt.len(),
            completion_tokens: req.max_tokens,
        };
        let _ = tx.send(done);
    }

    async fn boom() -> &'static str {
        panic!("a handler bug (this panic is expected by the test)")
    }

    /// The app over a fake engine on a free port, with `/panic` added and the key "k".
    fn server() -> (SocketAddr, Arc<Stats>, Arc<Fake>) {
        let (submit, jobs) = mpsc::channel::<Job>();
        let fake = Arc::new(Fake { stopped: AtomicUsize::new(0) });
        let f = fake.clone();
        std::thread::spawn(move || {
            for (req, tx) in jobs {
                let f = f.clone();
                std::thread::spawn(move || fake_sequence(req, tx, &f));
            }
        });
        let stats =
            Arc::new(Stats { running: AtomicUsize::new(0), running_max: AtomicUsize::new(0), slots: 4, cancelled: AtomicUsize::new(0) });
        let shared = Arc::new(Shared {
            model: api::Model { name: "org/m".into(), max_t: 64, vocab: 50257, eot: 50256 },
            tok: Tokenizer::gpt2().unwrap(),
            api_key: Some("k".into()),
            submit,
            stats: stats.clone(),
            started: 0,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                serve(listener, app(Router::new().route("/panic", get(boom)), shared)).await
            })
        });
        (addr, stats, fake)
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Sends `raw`, reads everything until the server closes.
    fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = connect(addr);
        s.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A POST with the key, closing the connection after it (HTTP/1.0 does by default).
    fn post(path: &str, version: &str, body: &str) -> Vec<u8> {
        let close = if version == "HTTP/1.0" { "" } else { "Connection: close\r\n" };
        format!("POST {path} {version}\r\nHost: x\r\nAuthorization: Bearer k\r\n{close}Content-Length: {}\r\n\r\n{body}", body.len())
            .into_bytes()
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn routes_errors_and_panics() {
        let (addr, _, _) = server();
        // keep-alive: two pipelined requests on one connection; HEAD has no body
        let out = exchange(
            addr,
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nHEAD /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(!out.contains("\"object\""), "{out}");
        // a model id with a '/', as is and %-escaped
        for path in ["/v1/models/org/m", "/v1/models/org%2Fm"] {
            let out = exchange(addr, format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n").as_bytes());
            assert!(out.starts_with("HTTP/1.1 200 ") && out.contains(r#""id":"org/m""#), "{out}");
        }
        let get = |path: &str, auth: &str| {
            exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes())
        };
        let error = |out: &str, status: &str, code: &str| {
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
            assert!(out.contains("\"error\"") && out.contains(&format!("\"code\":\"{code}\"")), "{out}");
        };
        error(&get("/v1/models/other", "Authorization: Bearer k\r\n"), "404", "model_not_found");
        error(&get("/nothing", ""), "404", "not_found");
        error(&get("/v1/nothing", "Authorization: Bearer k\r\n"), "404", "not_found");
        // the key: none, a wrong one
        for auth in ["", "Authorization: Bearer nope\r\n"] {
            let out = get("/v1/models", auth);
            error(&out, "401", "invalid_api_key");
            assert!(out.to_ascii_lowercase().contains("www-authenticate: bearer"), "{out}");
        }
        assert!(get("/metrics", "").contains("wgpt_slots 4"));
        // a wrong method: 405 with Allow
        let out = get("/v1/completions", "Authorization: Bearer k\r\n");
        error(&out, "405", "method_not_allowed");
        assert!(out.to_ascii_lowercase().contains("allow: post\r\n"), "{out}");
        error(&String::from_utf8_lossy(&exchange(addr, &post("/health", "HTTP/1.1", "")).into_bytes()), "405", "method_not_allowed");
        // bodies: malformed JSON, too large (by its length, and chunked), chunked and small
        error(&exchange(addr, &post("/v1/completions", "HTTP/1.1", "{\"prompt\": ")), "400", "invalid_json");
        let mut big =
            format!("POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n", 3 << 20).into_bytes();
        big.resize(big.len() + (3 << 20), b'x');
        error(&exchange(addr, &big), "413", "request_too_large");
        let mut chunked = b"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer k\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            chunked.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
            chunked.resize(chunked.len() + (1 << 20), b'x');
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        error(&exchange(addr, &chunked), "413", "request_too_large");
        let body = r#"{"prompt": "Hi", "max_tokens": 3}"#;
        let out = exchange(
            addr,
            format!(
                "POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer k\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        assert!(out.starts_with("HTTP/1.1 200 ") && out.contains(r#""text":"aaa""#), "{out}");
        // a panicking handler: 500 in OpenAI's shape, and the server goes on
        let out = get("/panic", "");
        assert!(out.starts_with("HTTP/1.1 500 ") && out.contains("\"type\":\"server_error\""), "{out}");
        assert!(get("/health", "").starts_with("HTTP/1.1 200 "));
    }

    #[test]
    fn streams_and_disconnects() {
        let (addr, stats, fake) = server();
        // HTTP/1.1: chunked server-sent events; HTTP/1.0: the body ends with the connection
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            let out = exchange(addr, &post("/v1/completions", version, r#"{"prompt": "Hi", "max_tokens": 3, "stream": true}"#));
            let (head, body) = out.split_once("\r\n\r\n").unwrap();
            let head = head.to_ascii_lowercase();
            assert!(head.contains(" 200 ok") && head.contains("content-type: text/event-stream"), "{out}");
            assert_eq!(head.contains("transfer-encoding: chunked"), version == "HTTP/1.1", "{out}");
            assert!(head.contains("connection: close"), "{out}");
            assert!(body.contains("data: [DONE]\n\n"), "{out}");
            assert_eq!(body.matches("data: {").count(), 4, "{out}"); // 3 tokens, the finish
        }
        // a streamed client that goes away after the first event
        let cancelled = stats.cancelled.load(Ordering::Relaxed);
        let mut s = connect(addr);
        s.write_all(&post("/v1/completions", "HTTP/1.1", r#"{"prompt": "Hi", "max_tokens": 60, "stream": true}"#)).unwrap();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("data: ") {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        drop(s);
        wait_for("the stream's cancel", || stats.cancelled.load(Ordering::Relaxed) == cancelled + 1);
        wait_for("the fake engine to stop", || fake.stopped.load(Ordering::Relaxed) == 1);
        // a client that gives up on a whole completion of 4 choices
        let mut s = connect(addr);
        s.write_all(&post("/v1/completions", "HTTP/1.1", r#"{"prompt": "Hi", "max_tokens": 60, "n": 4}"#)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
        wait_for("the whole completion's cancel", || stats.cancelled.load(Ordering::Relaxed) == cancelled + 5);
        wait_for("the fake engine to stop", || fake.stopped.load(Ordering::Relaxed) == 5);
    }
}
