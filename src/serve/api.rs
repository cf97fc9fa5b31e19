//! The OpenAI completions API, without any I/O: a request body → checked engine requests
//! ([`CompletionRequest::parse`], [`CompletionRequest::gen_requests`]), and what the engine sent
//! → response JSON, whole ([`completion_json`]) or as stream chunks ([`chunk_json`]).
//!
//! Every field is checked here, against the served model's context and vocabulary, with the
//! same rules as `Engine::check` (the engine runs on another thread; a request that reaches it
//! has passed them), so a bad request is a 400 that names the field and never takes a slot.

use crate::data::tokenizer::Tokenizer;
use crate::infer::engine::TokenOut;
use crate::infer::{FinishReason, GenRequest, SamplingParams};
use serde_json::{json, Map, Value};

/// `n` at most.
pub const MAX_N: usize = 64;
/// prompts × n at most (each is one engine request).
pub const MAX_CHOICES: usize = 256;
/// `logprobs` at most (vLLM's default limit).
pub const MAX_LOGPROBS: usize = 20;
/// stop strings at most.
pub const MAX_STOP: usize = 16;
/// `max_tokens` when the request has none (OpenAI's default), cut to the room the prompt leaves.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// An error answer: the status and OpenAI's body `{"error": {message, type, param, code}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error` or `server_error`
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, code: &'static str, param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: param.map(str::to_string), code: Some(code) }
    }

    /// A 400 about `param`.
    pub fn invalid(param: &str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request_error", code, Some(param), message)
    }

    pub fn server(status: u16, message: impl Into<String>) -> ApiError {
        ApiError::new(status, "server_error", "server_error", None, message)
    }

    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

/// What requests are checked against.
#[derive(Clone, Debug)]
pub struct Model {
    /// the id clients name in `model`
    pub name: String,
    /// positions per sequence (prompt + generated tokens), `--max-seq-len`
    pub max_t: usize,
    /// token ids are below this
    pub vocab: usize,
    /// `<|endoftext|>`: the prompt of an empty prompt
    pub eot: u32,
}

/// One prompt, tokenized and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// what the model is fed (never empty: an empty prompt is `<|endoftext|>`)
    pub ids: Vec<u32>,
    /// the prompt as text, for `echo` (a string prompt as given; token ids decoded)
    pub text: String,
    /// new tokens at most for this prompt (`max_tokens`, or the default cut to the room left)
    pub max_tokens: usize,
}

/// A checked `POST /v1/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    pub prompts: Vec<Prompt>,
    pub n: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub echo: bool,
    pub logprobs: Option<usize>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage
    pub include_usage: bool,
    /// vLLM's `return_token_ids`: `token_ids` and `prompt_token_ids` in each choice
    pub return_token_ids: bool,
    /// vLLM's `ignore_eos`: keep generating after `<|endoftext|>`
    pub ignore_eos: bool,
}

/// The fields a completions body may have; any other is refused (so a typo or an unsupported
/// vLLM extension is an error, never silently ignored).
const KNOWN: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "echo",
    "logprobs",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "suffix",
    "logit_bias",
    "return_token_ids",
    "ignore_eos",
    "repetition_penalty",
    "min_tokens",
];

/// `o[k]`, with null the same as absent.
fn field<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let mut s = v.to_string();
    if s.len() > 40 {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    format!("{kind} ({s})")
}

fn type_error(k: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(k, "invalid_type", format!("'{k}' must be {want}, got {}", describe(got)))
}

fn int(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => match (v.as_i64(), v.as_u64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(_)) => Ok(Some(i64::MAX)),
            _ => Err(type_error(k, "an integer", v)),
        },
    }
}

fn float(o: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| type_error(k, "a number", v)),
    }
}

fn boolean(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| type_error(k, "true or false", v)),
    }
}

/// A field only its default value is supported for.
fn only_default(o: &Map<String, Value>, k: &str, default: f64, what: &str) -> Result<(), ApiError> {
    match float(o, k)? {
        Some(x) if x != default => {
            Err(ApiError::invalid(k, "unsupported_value", format!("'{k}' {x} is not supported: {what} (only {default} is accepted)")))
        }
        _ => Ok(()),
    }
}

/// Token ids from a JSON list (already known to be a list).
fn token_ids(list: &[Value], vocab: usize) -> Result<Vec<u32>, ApiError> {
    list.iter()
        .map(|v| match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(id as u32),
            Some(id) => {
                Err(ApiError::invalid("prompt", "invalid_value", format!("token id {id} is outside the model's vocabulary of {vocab}")))
            }
            None => Err(type_error("prompt", "a list of token ids (integers ≥ 0)", v)),
        })
        .collect()
}

const PROMPT_SHAPES: &str = "a string, a list of strings, a list of token ids or a list of token-id lists";

/// The prompts of `prompt` as (ids, text); an empty prompt is `<|endoftext|>` with no text.
fn prompts(v: Option<&Value>, model: &Model, tok: &Tokenizer) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let from_text = |s: &str| if s.is_empty() { (vec![model.eot], String::new()) } else { (tok.encode(s), s.to_string()) };
    let from_ids = |ids: Vec<u32>| {
        if ids.is_empty() {
            (vec![model.eot], String::new())
        } else {
            let t = tok.decode(&ids);
            (ids, t)
        }
    };
    let Some(v) = v else { return Ok(vec![(vec![model.eot], String::new())]) }; // OpenAI: <|endoftext|>
    match v {
        Value::String(s) => Ok(vec![from_text(s)]),
        Value::Array(list) if list.is_empty() => Err(ApiError::invalid("prompt", "invalid_value", "'prompt' must not be an empty list")),
        Value::Array(list) if list.iter().all(Value::is_string) => Ok(list.iter().map(|s| from_text(s.as_str().unwrap_or(""))).collect()),
        Value::Array(list) if list.iter().all(Value::is_number) => Ok(vec![from_ids(token_ids(list, model.vocab)?)]),
        Value::Array(list) if list.iter().all(Value::is_array) => {
            list.iter().map(|l| Ok(from_ids(token_ids(l.as_array().map_or(&[][..], Vec::as_slice), model.vocab)?))).collect()
        }
        other => Err(type_error("prompt", PROMPT_SHAPES, other)),
    }
}

/// The context check of `Engine::check`, with the answer a client gets: a prompt that fills the
/// context, or a prompt + `max_tokens` beyond it.
pub fn check_context(prompt_len: usize, max_tokens: usize, max_t: usize) -> Result<(), ApiError> {
    if prompt_len >= max_t {
        return Err(ApiError::invalid(
            "prompt",
            "context_length_exceeded",
            format!("the prompt has {prompt_len} tokens; this server's context is {max_t} tokens (prompt + completion), so at most {} prompt tokens fit", max_t - 1),
        ));
    }
    if prompt_len.saturating_add(max_tokens) > max_t {
        return Err(ApiError::invalid(
            "max_tokens",
            "context_length_exceeded",
            format!(
                "this server's context is {max_t} tokens, but {} were requested ({prompt_len} in the prompt, {max_tokens} in the completion); lower max_tokens to {} at most",
                prompt_len.saturating_add(max_tokens),
                max_t - prompt_len
            ),
        ));
    }
    Ok(())
}

/// Checks that `model` names the served model: absent or null means it too. A wrong name is a
/// 404 (as OpenAI and vLLM answer).
pub fn check_model(v: Option<&Value>, served: &str) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s == served => Ok(()),
        Some(Value::String(s)) => Err(ApiError::new(
            404,
            "invalid_request_error",
            "model_not_found",
            Some("model"),
            format!("the model '{s}' does not exist; this server serves '{served}' (see GET /v1/models)"),
        )),
        Some(other) => Err(type_error("model", "a string", other)),
    }
}

/// The body as a JSON object, or the 400 for a body that is not one.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(400, "invalid_request_error", "invalid_json", None, format!("the request body is not valid JSON: {e}"))
    })?;
    match v {
        Value::Object(o) => Ok(o),
        other => Err(ApiError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            None,
            format!("the request body must be a JSON object, got {}", describe(&other)),
        )),
    }
}

impl CompletionRequest {
    /// Parses and checks a completions body for `model`.
    pub fn parse(body: &[u8], model: &Model, tok: &Tokenizer) -> Result<CompletionRequest, ApiError> {
        let o = parse_object(body)?;
        check_model(o.get("model"), &model.name)?;
        if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(ApiError::invalid(
                k,
                "unknown_parameter",
                format!("unknown field '{k}' (the supported fields are listed in the README, \"Serving\")"),
            ));
        }

        let n = match int(&o, "n")? {
            None => 1,
            Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
            Some(n) => return Err(ApiError::invalid("n", "invalid_value", format!("'n' must be in 1..={MAX_N}, got {n}"))),
        };
        if let Some(b) = int(&o, "best_of")? {
            if b != n as i64 {
                return Err(ApiError::invalid(
                    "best_of",
                    "unsupported_value",
                    format!("'best_of' {b} is not supported: only best_of = n ({n}) is accepted"),
                ));
            }
        }
        let temperature = match float(&o, "temperature")? {
            None => 1.0,
            Some(t) if t >= 0.0 && t.is_finite() => t as f32,
            Some(t) => {
                return Err(ApiError::invalid(
                    "temperature",
                    "invalid_value",
                    format!("'temperature' must be 0 (greedy) or positive, got {t}"),
                ))
            }
        };
        let top_p = match float(&o, "top_p")? {
            None => 1.0,
            Some(p) if p > 0.0 && p <= 1.0 => p as f32,
            Some(p) => return Err(ApiError::invalid("top_p", "invalid_value", format!("'top_p' must be in (0, 1], got {p}"))),
        };
        let top_k = match int(&o, "top_k")? {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid("top_k", "invalid_value", format!("'top_k' must be -1 or 0 (off) or at least 1, got {k}")))
            }
        };
        let seed = match field(&o, "seed") {
            None => None,
            Some(v) => Some(v.as_u64().or_else(|| v.as_i64().map(|i| i as u64)).ok_or_else(|| type_error("seed", "an integer", v))?),
        };
        let stop = match field(&o, "stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(l)) if l.iter().all(Value::is_string) => l.iter().filter_map(|s| s.as_str().map(str::to_string)).collect(),
            Some(other) => return Err(type_error("stop", "a string or a list of strings", other)),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid("stop", "invalid_value", format!("at most {MAX_STOP} stop strings, got {}", stop.len())));
        }
        let echo = boolean(&o, "echo")?.unwrap_or(false);
        let logprobs = match field(&o, "logprobs") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(k) if k as usize <= MAX_LOGPROBS => Some(k as usize),
                Some(k) => {
                    return Err(ApiError::invalid(
                        "logprobs",
                        "invalid_value",
                        format!("'logprobs' must be in 0..={MAX_LOGPROBS}, got {k}"),
                    ))
                }
                None => return Err(type_error("logprobs", &format!("an integer in 0..={MAX_LOGPROBS}"), v)),
            },
        };
        if echo && logprobs.is_some() {
            return Err(ApiError::invalid(
                "echo",
                "unsupported_value",
                "'echo' with 'logprobs' is not supported: it would need the prompt's log-probabilities, which this server does not compute",
            ));
        }
        let stream = boolean(&o, "stream")?.unwrap_or(false);
        let include_usage = match field(&o, "stream_options") {
            None => false,
            Some(_) if !stream => {
                return Err(ApiError::invalid("stream_options", "invalid_value", "'stream_options' is only allowed when 'stream' is true"))
            }
            Some(Value::Object(so)) => {
                if let Some(k) = so.keys().find(|k| k.as_str() != "include_usage") {
                    return Err(ApiError::invalid("stream_options", "unknown_parameter", format!("unknown field 'stream_options.{k}'")));
                }
                boolean(so, "include_usage")
                    .map_err(|_| type_error("stream_options", "{\"include_usage\": true|false}", &so["include_usage"]))?
                    .unwrap_or(false)
            }
            Some(other) => return Err(type_error("stream_options", "an object", other)),
        };
        let return_token_ids = boolean(&o, "return_token_ids")?.unwrap_or(false);
        let ignore_eos = boolean(&o, "ignore_eos")?.unwrap_or(false);

        // accepted, and only at their defaults
        if let Some(v) = field(&o, "user") {
            if !v.is_string() {
                return Err(type_error("user", "a string", v));
            }
        }
        only_default(&o, "presence_penalty", 0.0, "there are no penalties")?;
        only_default(&o, "frequency_penalty", 0.0, "there are no penalties")?;
        only_default(&o, "repetition_penalty", 1.0, "there are no penalties")?;
        if int(&o, "min_tokens")?.is_some_and(|m| m != 0) {
            return Err(ApiError::invalid("min_tokens", "unsupported_value", "'min_tokens' is not supported (only 0 is accepted)"));
        }
        match field(&o, "suffix") {
            None => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    "suffix",
                    "unsupported_value",
                    "'suffix' is not supported: GPT-2 has no insertion mode (only null)",
                ))
            }
        }
        match field(&o, "logit_bias") {
            None => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(_) => return Err(ApiError::invalid("logit_bias", "unsupported_value", "'logit_bias' is not supported (only null or {})")),
        }

        // the prompts last: they are the expensive part (tokenizing)
        let texts = prompts(field(&o, "prompt"), model, tok)?;
        if texts.len() * n > MAX_CHOICES {
            return Err(ApiError::invalid(
                "n",
                "invalid_value",
                format!("{} prompts × n = {} choices; at most {MAX_CHOICES} per request", texts.len(), texts.len() * n),
            ));
        }
        let max_tokens = match int(&o, "max_tokens")? {
            None => None,
            Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            Some(m) => return Err(ApiError::invalid("max_tokens", "invalid_value", format!("'max_tokens' must be at least 1, got {m}"))),
        };
        let mut prompts = Vec::with_capacity(texts.len());
        for (ids, text) in texts {
            let room = model.max_t.saturating_sub(ids.len());
            let max_tokens = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS.min(room.max(1)));
            check_context(ids.len(), max_tokens, model.max_t)?;
            prompts.push(Prompt { ids, text, max_tokens });
        }
        Ok(CompletionRequest {
            prompts,
            n,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            echo,
            logprobs,
            stream,
            include_usage,
            return_token_ids,
            ignore_eos,
        })
    }

    /// Engine requests, one per choice: choice `p·n + i` is prompt p's i-th, seeded `seed + i`
    /// (or `random_seed()` when the request has no seed).
    pub fn gen_requests(&self, mut random_seed: impl FnMut() -> u64) -> Vec<GenRequest> {
        let mut out = Vec::with_capacity(self.prompts.len() * self.n);
        for p in &self.prompts {
            for i in 0..self.n {
                let seed = match self.seed {
                    Some(s) => s.wrapping_add(i as u64),
                    None => random_seed(),
                };
                out.push(GenRequest {
                    prompt: p.ids.clone(),
                    max_tokens: p.max_tokens,
                    sampling: SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed },
                    stop: self.stop.clone(),
                    stop_at_eot: !self.ignore_eos,
                    logprobs: self.logprobs,
                });
            }
        }
        out
    }

    /// The prompt of choice `index`.
    pub fn prompt_of(&self, index: usize) -> &Prompt {
        &self.prompts[index / self.n]
    }

    /// Prompt tokens of the usage: each prompt once, whatever n is.
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.ids.len()).sum()
    }
}

/// One choice as the engine produced it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Choice {
    pub text: String,
    /// generated ids; the last is `<|endoftext|>` when the sequence ended on it
    pub ids: Vec<u32>,
    /// per `Token` event (so not for a final `<|endoftext|>`), when logprobs were asked for
    pub logprobs: Vec<(f32, Vec<(u32, f32)>)>,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
}

impl Choice {
    pub fn token(&mut self, t: TokenOut) {
        self.text.push_str(&t.text);
        self.ids.push(t.id);
        if let Some(lp) = t.logprob {
            self.logprobs.push(lp);
        }
    }

    /// The `Done` event. The engine counts a final `<|endoftext|>` but sends no `Token` for it:
    /// it is added to `ids` here (as vLLM reports it).
    pub fn done(&mut self, reason: FinishReason, tail: &str, completion_tokens: usize, eot: u32) {
        self.text.push_str(tail);
        if completion_tokens > self.ids.len() {
            self.ids.push(eot);
        }
        self.finish = Some(reason);
        self.completion_tokens = completion_tokens;
    }
}

/// The text of one token (lossy UTF-8: a token may hold part of a character).
pub fn token_text(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(tok.decode_bytes(id).unwrap_or(&[])).into_owned()
}

/// OpenAI's legacy logprobs object for `ids` (zipped with their logprobs); `text_offset` counts
/// characters from `offset`. Returns it and the offset after the last token.
pub fn logprobs_json(tok: &Tokenizer, ids: &[u32], lps: &[(f32, Vec<(u32, f32)>)], offset: usize) -> (Value, usize) {
    let (mut tokens, mut token_logprobs, mut top, mut offsets, mut at) = (vec![], vec![], vec![], vec![], offset);
    for (&id, (lp, alts)) in ids.iter().zip(lps) {
        let s = token_text(tok, id);
        offsets.push(at);
        at += s.chars().count();
        let mut m = Map::new();
        for &(a, l) in alts {
            m.entry(token_text(tok, a)).or_insert(json!(l));
        }
        // OpenAI: the sampled token is always there, so up to logprobs + 1 entries
        m.entry(s.clone()).or_insert(json!(lp));
        tokens.push(Value::String(s));
        token_logprobs.push(json!(lp));
        top.push(Value::Object(m));
    }
    (json!({ "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets }), at)
}

/// Response ids and time, shared by a response's chunks.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens })
}

/// The whole (non-streamed) response.
pub fn completion_json(meta: &Meta, req: &CompletionRequest, choices: &[Choice], tok: &Tokenizer) -> Value {
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = req.prompt_of(i);
            let text = if req.echo { format!("{}{}", p.text, c.text) } else { c.text.clone() };
            let lp = req.logprobs.map_or(Value::Null, |_| logprobs_json(tok, &c.ids, &c.logprobs, 0).0);
            let mut v = json!({ "index": i, "text": text, "logprobs": lp, "finish_reason": c.finish.map(FinishReason::as_str) });
            if req.return_token_ids {
                v["token_ids"] = json!(c.ids);
                v["prompt_token_ids"] = json!(p.ids);
            }
            v
        })
        .collect();
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({
        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
        "choices": out, "usage": usage_json(req.prompt_tokens(), completion),
    })
}

/// One stream chunk with `choices` (from [`choice_delta`]; none in the final usage chunk) and,
/// when given, `usage` (OpenAI puts `"usage": null` in every other chunk when include_usage is set).
pub fn chunk_json(meta: &Meta, choices: Vec<Value>, usage: Option<Value>) -> Value {
    let mut v = json!({ "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model, "choices": choices });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

/// A stream chunk's choice.
pub fn choice_delta(index: usize, text: &str, logprobs: Option<Value>, finish: Option<FinishReason>) -> Value {
    json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish.map(FinishReason::as_str) })
}

/// `GET /v1/models`.
pub fn models_json(model: &Model, created: u64) -> Value {
    json!({ "object": "list", "data": [model_json(model, created)] })
}

/// `GET /v1/models/{id}`.
pub fn model_json(model: &Model, created: u64) -> Value {
    json!({ "id": model.name, "object": "model", "created": created, "owned_by": "wgpt", "max_model_len": model.max_t })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        Model { name: "m".into(), max_t: 32, vocab: 50257, eot: 50256 }
    }

    fn parse(body: &str) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(body.as_bytes(), &model(), &Tokenizer::gpt2().unwrap())
    }

    fn err(body: &str) -> ApiError {
        parse(body).expect_err(body)
    }

    #[test]
    fn defaults_and_prompt_shapes() {
        assert_eq!(parse(r#"{"max_tokens": 5}"#).unwrap().prompts[0].max_tokens, 5);
        assert_eq!(parse(r#"{"top_k": 3}"#).unwrap().top_k, 3);
        let r = parse(r#"{"model": "m", "prompt": "Hello world"}"#).unwrap();
        assert_eq!(r.prompts, vec![Prompt { ids: vec![15496, 995], text: "Hello world".into(), max_tokens: 16 }]);
        assert_eq!((r.n, r.temperature, r.top_p, r.top_k, r.seed, r.stream, r.echo), (1, 1.0, 1.0, 0, None, false, false));
        // no model, no prompt: <|endoftext|>; an empty string too
        for body in [r#"{}"#, r#"{"prompt": ""}"#, r#"{"prompt": [[]]}"#] {
            assert_eq!(parse(body).unwrap().prompts[0].ids, vec![50256], "{body}");
        }
        let r = parse(r#"{"prompt": ["a", "b"], "n": 2}"#).unwrap();
        assert_eq!(r.prompts.len(), 2);
        let r = parse(r#"{"prompt": [1, 2, 3]}"#).unwrap();
        assert_eq!(r.prompts.len(), 1);
        assert_eq!(r.prompts[0].ids, vec![1, 2, 3]);
        let r = parse(r#"{"prompt": [[1, 2], [3]]}"#).unwrap();
        assert_eq!(r.prompts.iter().map(|p| p.ids.clone()).collect::<Vec<_>>(), vec![vec![1, 2], vec![3]]);
        // the default max_tokens is cut to the room the prompt leaves
        let long: Vec<u32> = (0..30).collect();
        let r = parse(&format!(r#"{{"prompt": {long:?}}}"#)).unwrap();
        assert_eq!(r.prompts[0].max_tokens, 2);
    }

    #[test]
    fn choices_and_seeds() {
        let r = parse(r#"{"prompt": ["a", "b"], "n": 3, "seed": 10, "temperature": 0.5, "top_k": 5, "stop": "x"}"#).unwrap();
        let g = r.gen_requests(|| unreachable!());
        assert_eq!(g.len(), 6);
        assert_eq!(g.iter().map(|q| q.sampling.seed).collect::<Vec<_>>(), vec![10, 11, 12, 10, 11, 12]);
        assert_eq!(r.prompt_of(4).text, "b");
        assert!(g.iter().all(|q| q.stop == vec!["x".to_string()] && q.stop_at_eot && q.sampling.top_k == 5));
        let mut k = 100;
        let g = parse(r#"{"prompt": "a", "n": 2}"#).unwrap().gen_requests(|| {
            k += 1;
            k
        });
        assert_eq!(g.iter().map(|q| q.sampling.seed).collect::<Vec<_>>(), vec![101, 102]);
        // -1 and 0 turn top_k off; a negative seed wraps
        assert_eq!(parse(r#"{"top_k": -1, "seed": -1}"#).unwrap().top_k, 0);
        assert_eq!(parse(r#"{"seed": -1}"#).unwrap().seed, Some(u64::MAX));
    }

    #[test]
    fn bad_fields_name_the_field() {
        let cases = [
            (r#"{"max_tokens": "ten"}"#, "max_tokens", "invalid_type"),
            (r#"{"max_tokens": 0}"#, "max_tokens", "invalid_value"),
            (r#"{"max_tokens": 40}"#, "max_tokens", "context_length_exceeded"),
            (r#"{"max_tokens": 18446744073709551615}"#, "max_tokens", "context_length_exceeded"),
            (r#"{"temperature": -0.1}"#, "temperature", "invalid_value"),
            (r#"{"temperature": "hot"}"#, "temperature", "invalid_type"),
            (r#"{"top_p": 0}"#, "top_p", "invalid_value"),
            (r#"{"top_p": 1.5}"#, "top_p", "invalid_value"),
            (r#"{"top_k": -2}"#, "top_k", "invalid_value"),
            (r#"{"n": 0}"#, "n", "invalid_value"),
            (r#"{"n": 1000}"#, "n", "invalid_value"),
            (r#"{"n": 2, "best_of": 3}"#, "best_of", "unsupported_value"),
            (r#"{"stop": 5}"#, "stop", "invalid_type"),
            (r#"{"stream": "yes"}"#, "stream", "invalid_type"),
            (r#"{"stream_options": {"include_usage": true}}"#, "stream_options", "invalid_value"),
            (r#"{"logprobs": 50}"#, "logprobs", "invalid_value"),
            (r#"{"logprobs": true}"#, "logprobs", "invalid_type"),
            (r#"{"logprobs": 1, "echo": true}"#, "echo", "unsupported_value"),
            (r#"{"presence_penalty": 0.5}"#, "presence_penalty", "unsupported_value"),
            (r#"{"frequency_penalty": -1}"#, "frequency_penalty", "unsupported_value"),
            (r#"{"suffix": "end"}"#, "suffix", "unsupported_value"),
            (r#"{"logit_bias": {"1": 2}}"#, "logit_bias", "unsupported_value"),
            (r#"{"prompt": 5}"#, "prompt", "invalid_type"),
            (r#"{"prompt": []}"#, "prompt", "invalid_value"),
            (r#"{"prompt": ["a", 1]}"#, "prompt", "invalid_type"),
            (r#"{"prompt": [1, -1]}"#, "prompt", "invalid_type"),
            (r#"{"prompt": [50257]}"#, "prompt", "invalid_value"),
            (r#"{"prompt": "a", "frobnicate": 1}"#, "frobnicate", "unknown_parameter"),
            (r#"{"model": 3}"#, "model", "invalid_type"),
        ];
        for (body, param, code) in cases {
            let e = err(body);
            assert_eq!((e.status, e.param.as_deref(), e.code), (400, Some(param), Some(code)), "{body}: {e:?}");
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
        // accepted at their defaults
        parse(r#"{"presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "suffix": null, "user": "u", "logit_bias": {}}"#).unwrap();
        // a prompt that fills the context
        let long: Vec<u32> = (0..32).collect();
        let e = err(&format!(r#"{{"prompt": {long:?}, "max_tokens": 1}}"#));
        assert_eq!((e.param.as_deref(), e.code), (Some("prompt"), Some("context_length_exceeded")));
        // unknown model: 404; malformed JSON and a non-object: 400 with no param
        let e = err(r#"{"model": "gpt-4", "prompt": "x"}"#);
        assert_eq!((e.status, e.code), (404, Some("model_not_found")));
        for body in ["{\"prompt\": ", "[1, 2]", ""] {
            let e = err(body);
            assert_eq!((e.status, e.param.as_deref(), e.code), (400, None, Some("invalid_json")), "{body:?}");
        }
    }

    #[test]
    fn responses_have_the_openai_shape() {
        let tok = Tokenizer::gpt2().unwrap();
        let r = parse(r#"{"prompt": "Hi", "logprobs": 1, "return_token_ids": true}"#).unwrap();
        let mut c = Choice::default();
        c.token(TokenOut { id: 15496, text: "Hello".into(), logprob: Some((-0.5, vec![(995, -0.25)])) });
        c.token(TokenOut { id: 995, text: " world".into(), logprob: Some((-0.75, vec![(995, -0.75)])) });
        c.done(FinishReason::Stop, "", 3, 50256); // ended on <|endoftext|>
        let meta = Meta { id: "cmpl-1".into(), created: 7, model: "m".into() };
        let v = completion_json(&meta, &r, &[c], &tok);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"], json!({"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}));
        let ch = &v["choices"][0];
        assert_eq!((ch["text"].as_str(), ch["finish_reason"].as_str()), (Some("Hello world"), Some("stop")));
        assert_eq!(ch["token_ids"], json!([15496, 995, 50256]));
        assert_eq!(ch["prompt_token_ids"], json!([17250]));
        let lp = &ch["logprobs"];
        assert_eq!(lp["tokens"], json!(["Hello", " world"]));
        assert_eq!(lp["token_logprobs"], json!([-0.5, -0.75]));
        assert_eq!(lp["text_offset"], json!([0, 5]));
        assert_eq!(lp["top_logprobs"][0], json!({" world": -0.25, "Hello": -0.5}));
        assert_eq!(lp["top_logprobs"][1], json!({" world": -0.75}));
        let e = ApiError::invalid("n", "invalid_value", "bad").body();
        assert_eq!(e, json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}}));
    }
}
