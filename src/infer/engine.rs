//! Sequences and continuous batching. An [`Engine`] owns (or borrows) a [`Session`] whose graph
//! has the decoding phases, and runs many sequences at once, one per cache slot:
//!
//! * [`Engine::submit`] queues a request with the channel its [`Event`]s go to;
//! * [`Engine::step`] admits queued requests into free slots (prefilling their prompts), then
//!   runs ONE decode step for every running sequence, samples each one's next token and sends it;
//! * a sequence leaves its slot the moment it finishes (max tokens, a stop string, `<|endoftext|>`,
//!   the end of the context) or its receiver is gone (a client that disconnected), so the next
//!   queued request takes the slot at the following step.
//!
//! Each sequence samples with its own seeded generator from its own row of logits, and every
//! decode step runs all `slots` rows whatever is running, so a sequence's tokens do not depend on
//! what else is in the batch.

use super::sampler::{logprobs, Sampler, SamplingParams};
use super::{decode, prefill, Row};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::train::session::Session;
use std::borrow::BorrowMut;
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// the prompt's token ids (at least one: callers start an empty prompt with `<|endoftext|>`)
    pub prompt: Vec<u32>,
    /// new tokens at most
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// stop before the first occurrence of any of these in the generated text
    pub stop: Vec<String>,
    /// stop when `<|endoftext|>` is sampled (it is not part of the output)
    pub stop_at_eot: bool,
    /// report each token's log-probability and this many most likely alternatives
    pub logprobs: Option<usize>,
}

/// Why a sequence ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// a stop string or `<|endoftext|>`
    Stop,
    /// `max_tokens` or the end of the context
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated token.
#[derive(Clone, Debug)]
pub struct TokenOut {
    pub id: u32,
    /// text released with this token: held back while it could still be the start of a stop
    /// string, and whole UTF-8 characters only, so it may be empty
    pub text: String,
    /// (log-probability of `id`, the most likely alternatives), when asked for
    pub logprob: Option<(f32, Vec<(u32, f32)>)>,
}

/// What a request's channel receives: tokens, then `Done` (or `Error`).
#[derive(Clone, Debug)]
pub enum Event {
    Token(TokenOut),
    Done {
        reason: FinishReason,
        /// the text not yet released by a `Token` (the generated text is the `Token` texts + this)
        tail: String,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

struct Seq {
    req: GenRequest,
    tx: Sender<Event>,
    sampler: Sampler,
    slot: usize,
    /// the next token to feed, at position `pos`
    next: u32,
    pos: usize,
    generated: Vec<u32>,
    /// bytes of the generated text (without stop-at-EOT tokens), and how many were released
    bytes: Vec<u8>,
    sent: usize,
}

/// Runs sequences through the decoding phases of a session.
pub struct Engine<S: BorrowMut<Session>> {
    sess: S,
    tok: Option<Tokenizer>,
    eot: u32,
    running: Vec<Option<Seq>>,
    queue: VecDeque<(GenRequest, Sender<Event>)>,
}

impl<S: BorrowMut<Session>> Engine<S> {
    /// `sess` must have the decoding phases (`graph::add_decoder`); `tok` turns tokens into text
    /// (no tokenizer: no text and no stop strings, only ids).
    pub fn new(sess: S, tok: Option<Tokenizer>) -> Result<Engine<S>> {
        let g = &sess.borrow().graph;
        let io = g.decode.as_ref().ok_or_else(|| Error::Internal("Engine: the graph has no decoding phases".into()))?;
        let eot = tok.as_ref().map_or(crate::model::config::GPT2_EOT, |t| t.eot());
        let slots = io.opts.slots;
        Ok(Engine { sess, tok, eot, running: (0..slots).map(|_| None).collect(), queue: VecDeque::new() })
    }

    pub fn session(&mut self) -> &mut Session {
        self.sess.borrow_mut()
    }

    /// Positions per sequence (prompt + generated tokens at most).
    pub fn max_t(&self) -> usize {
        self.sess.borrow().graph.decode.as_ref().map_or(0, |d| d.opts.max_t)
    }

    /// Sequences that can run at once.
    pub fn slots(&self) -> usize {
        self.running.len()
    }

    /// Why `req` cannot run, as a message naming the field (`prompt`, `max_tokens`).
    pub fn check(&self, req: &GenRequest) -> std::result::Result<(), (&'static str, String)> {
        let (max_t, v) = (self.max_t(), self.sess.borrow().graph.cfg.v);
        if req.prompt.is_empty() {
            return Err(("prompt", "the prompt has no tokens".into()));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&id| id as usize >= v) {
            return Err(("prompt", format!("token id {bad} is outside the model's vocabulary of {v}")));
        }
        if req.prompt.len() >= max_t {
            return Err(("prompt", format!("the prompt has {} tokens; the context is {max_t}", req.prompt.len())));
        }
        if req.prompt.len() + req.max_tokens > max_t {
            return Err((
                "max_tokens",
                format!("{} prompt tokens + max_tokens {} exceed the context of {max_t} tokens", req.prompt.len(), req.max_tokens),
            ));
        }
        Ok(())
    }

    /// Queues a request; its events go to `tx`. A request that fails [`Engine::check`] gets an
    /// `Event::Error` at once.
    pub fn submit(&mut self, req: GenRequest, tx: Sender<Event>) {
        match self.check(&req) {
            Ok(()) => self.queue.push_back((req, tx)),
            Err((_, msg)) => {
                let _ = tx.send(Event::Error(msg));
            }
        }
    }

    /// Nothing running and nothing queued.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.iter().all(Option::is_none)
    }

    /// Sequences running now.
    pub fn running(&self) -> usize {
        self.running.iter().filter(|s| s.is_some()).count()
    }

    /// Admits what fits, then one decode step for every running sequence. On a backend error
    /// every running and queued request gets `Event::Error` and the error is returned.
    pub fn step(&mut self) -> Result<()> {
        let r = self.try_step();
        if let Err(e) = &r {
            let msg = e.to_string();
            for s in self.running.iter_mut().filter_map(Option::take) {
                let _ = s.tx.send(Event::Error(msg.clone()));
            }
            for (_, tx) in self.queue.drain(..) {
                let _ = tx.send(Event::Error(msg.clone()));
            }
        }
        r
    }

    fn try_step(&mut self) -> Result<()> {
        // admit: each new sequence's prompt but its last token goes into its cache slot
        while let Some(slot) = self.running.iter().position(Option::is_none) {
            let Some((req, tx)) = self.queue.pop_front() else { break };
            let p = req.prompt.len();
            let rows: Vec<Row> = req.prompt[..p - 1].iter().enumerate().map(|(pos, &token)| Row { slot, pos, token }).collect();
            prefill(self.sess.borrow_mut(), &rows)?;
            let (next, sampler) = (req.prompt[p - 1], Sampler::new(req.sampling));
            self.running[slot] = Some(Seq { req, tx, sampler, slot, next, pos: p - 1, generated: Vec::new(), bytes: Vec::new(), sent: 0 });
        }
        let rows: Vec<Row> = self.running.iter().flatten().map(|s| Row { slot: s.slot, pos: s.pos, token: s.next }).collect();
        if rows.is_empty() {
            return Ok(());
        }
        let logits = decode(self.sess.borrow_mut(), &rows)?;
        let v = logits.len() / rows.len();
        let (tok, eot, max_t) = (self.tok.clone(), self.eot, self.max_t());
        for (row, r) in logits.chunks(v).zip(&rows) {
            let seq = self.running[r.slot].as_mut().expect("a row per running sequence");
            let done = advance(seq, row, tok.as_ref(), eot, max_t);
            let keep = match done {
                Ok(None) => true,
                Ok(Some(reason)) => {
                    let tail = String::from_utf8_lossy(&seq.bytes[seq.sent..]).into_owned();
                    let (prompt_tokens, completion_tokens) = (seq.req.prompt.len(), seq.generated.len());
                    let _ = seq.tx.send(Event::Done { reason, tail, prompt_tokens, completion_tokens });
                    false
                }
                Err(()) => false, // the receiver is gone
            };
            if !keep {
                self.running[r.slot] = None;
            }
        }
        Ok(())
    }

    /// Serves requests from `rx` until it closes and everything has finished: blocks while idle,
    /// and takes every request that arrived between decode steps into the batch. `after_step`
    /// sees the engine after every step (e.g. to publish how many sequences run).
    pub fn serve(&mut self, rx: Receiver<(GenRequest, Sender<Event>)>, mut after_step: impl FnMut(&Self)) {
        let mut open = true;
        while open || !self.is_idle() {
            if self.is_idle() {
                match rx.recv() {
                    Ok((req, tx)) => self.submit(req, tx),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok((req, tx)) => self.submit(req, tx),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            // a failed step has answered every request with Event::Error; the next ones may work
            if let Err(e) = self.step() {
                eprintln!("wgpt: generation step failed: {e}");
            }
            after_step(self);
        }
    }
}

/// Samples `seq`'s next token from its logits `row` and sends it. Returns Ok(Some(reason)) when
/// the sequence is finished, Err(()) when its receiver is gone.
fn advance(seq: &mut Seq, row: &[f32], tok: Option<&Tokenizer>, eot: u32, max_t: usize) -> std::result::Result<Option<FinishReason>, ()> {
    let id = seq.sampler.sample(row);
    let logprob = seq.req.logprobs.map(|k| logprobs(row, id, k));
    if seq.req.stop_at_eot && id == eot {
        seq.generated.push(id);
        return Ok(Some(FinishReason::Stop));
    }
    seq.generated.push(id);
    if let Some(t) = tok {
        seq.bytes.extend_from_slice(t.decode_bytes(id).unwrap_or(&[]));
    }
    // the text not yet released (whole characters), the first stop string in it, and what may be
    // released. Released text holds no stop string and ends at least `hold` bytes before the
    // decoded end, so a stop can only start in the last `hold` released bytes or after them.
    let hold = seq.req.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
    let valid = match std::str::from_utf8(&seq.bytes[seq.sent..]) {
        Ok(s) => seq.sent + s.len(),
        Err(e) => seq.sent + e.valid_up_to(),
    };
    let text = std::str::from_utf8(&seq.bytes[..valid]).expect("released text and a valid tail");
    let mut from = seq.sent.saturating_sub(hold);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let stop_at = seq.req.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min();
    let (release, reason) = match stop_at {
        Some(i) => (i.max(seq.sent), Some(FinishReason::Stop)),
        None => {
            let mut end = valid.saturating_sub(hold).max(seq.sent);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let full = seq.generated.len() >= seq.req.max_tokens || seq.pos + 1 >= max_t;
            (end, full.then_some(FinishReason::Length))
        }
    };
    let delta = text[seq.sent..release].to_string();
    seq.sent = release;
    if reason == Some(FinishReason::Stop) {
        seq.bytes.truncate(release); // nothing of the stop string is released
    }
    seq.tx.send(Event::Token(TokenOut { id, text: delta, logprob })).map_err(|_| ())?;
    seq.next = id;
    seq.pos += 1;
    Ok(reason)
}

/// Runs one request to the end on `engine` (nothing else running) and returns its generated ids
/// and text; `on_token` sees every token as it is produced (for streaming to a terminal).
pub fn generate<S: BorrowMut<Session>>(
    engine: &mut Engine<S>, req: GenRequest, mut on_token: impl FnMut(&TokenOut),
) -> Result<(Vec<u32>, String, FinishReason)> {
    let (tx, rx) = std::sync::mpsc::channel();
    engine.submit(req, tx);
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        engine.step()?;
        for ev in rx.try_iter() {
            match ev {
                Event::Token(t) => {
                    on_token(&t);
                    ids.push(t.id);
                    text.push_str(&t.text);
                }
                Event::Done { reason, tail, .. } => {
                    text.push_str(&tail);
                    return Ok((ids, text, reason));
                }
                Event::Error(e) => return Err(Error::Data(e)),
            }
        }
    }
}
