//! A small HTTP/1.1 server on `std::net`: a thread per connection (no pool, so keep-alive
//! connections never starve new ones), request heads parsed by `httparse`, bodies by
//! Content-Length (at most [`MAX_BODY`]), answers with a length, and server-sent events —
//! chunked on HTTP/1.1 (the connection stays usable), until the close on HTTP/1.0 — where a
//! failed write means the client has gone.
//!
//! A handler gets each request with a [`Responder`]; a panicking handler is caught here: its
//! request is answered 500 if nothing was sent yet, the connection is closed, the server goes on.

use super::api::ApiError;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Request bodies larger than this are refused (413).
pub const MAX_BODY: usize = 1 << 20;
/// Request line + headers at most.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 100;
/// Open connections at most; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 1024;
/// How long an idle keep-alive connection (or a slow request head) is kept.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that stops reading for this long is treated as gone (its stream is cancelled).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// One request, its body read.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// the request target as sent (path and query)
    pub target: String,
    /// HTTP/1.`minor`
    pub minor: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The target without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    fn keep_alive(&self) -> bool {
        let close = self.header("Connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        self.minor >= 1 && !close
    }
}

pub type Handler = dyn Fn(&Request, &mut Responder) + Send + Sync;

/// Accepts connections on `listener` forever, each on a thread of its own.
pub fn serve(listener: TcpListener, handler: Arc<Handler>) -> io::Error {
    let open = Arc::new(AtomicUsize::new(0));
    let mut last_error: Option<Instant> = None;
    loop {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // out of file descriptors and the like: say so (at most once a minute) and go on
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    eprintln!("wgpt serve: accepting a connection failed: {e}");
                    last_error = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            let e = ApiError::server(503, format!("too many open connections (at most {MAX_CONNECTIONS})"));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            Responder::new(&mut stream, 1, false, false).error(&e);
            continue;
        }
        let (handler, open2) = (handler.clone(), open.clone());
        let spawned = std::thread::Builder::new().name("wgpt-http".into()).spawn(move || {
            connection(stream, &*handler);
            open2.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::AcqRel); // the stream was dropped with the closure: closed
        }
    }
}

/// Serves the requests of one connection until it closes, fails or idles out.
fn connection(mut stream: TcpStream, handler: &Handler) {
    let _ = stream.set_nodelay(true); // each SSE event goes out at once
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut buf = Vec::new();
    loop {
        let req = match read_request(&mut stream, &mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                Responder::new(&mut stream, 1, false, false).error(&e);
                if e.status == 413 {
                    linger(&mut stream);
                }
                return;
            }
        };
        let mut out = Responder::new(&mut stream, req.minor, req.keep_alive(), req.method == "HEAD");
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&req, &mut out))).is_ok();
        if !ok {
            eprintln!("wgpt serve: the handler of {} {} panicked; the connection is closed", req.method, req.target);
            out.keep_alive = false;
        }
        if !out.started && !out.failed {
            out.keep_alive = false;
            out.error(&ApiError::server(500, "internal error: the request was not answered"));
        }
        if !out.keep_alive || out.failed {
            return;
        }
    }
}

/// After refusing a body that is still coming: stop writing, read (and drop) what the client
/// still sends for a while, so it gets to read the answer instead of a reset.
fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let (mut left, mut sink) = (64usize << 20, [0u8; 64 << 10]);
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

fn bad_request(status: u16, code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(status, "invalid_request_error", code, None, msg)
}

/// The next request on the connection (`buf` holds what was read past the previous one), or
/// None when the client closed the connection or let it idle out.
fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Request>, ApiError> {
    let mut chunk = [0u8; 16 << 10];
    let (mut req, head_len) = loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut p = httparse::Request::new(&mut headers);
            match p.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let req = Request {
                        method: p.method.unwrap_or("").to_string(),
                        target: p.path.unwrap_or("").to_string(),
                        minor: p.version.unwrap_or(1),
                        headers: p
                            .headers
                            .iter()
                            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
                            .collect(),
                        body: Vec::new(),
                    };
                    break (req, n);
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err(bad_request(431, "request_header_too_large", format!("the request head is larger than {MAX_HEAD} bytes")))
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(bad_request(431, "request_header_too_large", format!("more than {MAX_HEADERS} request headers")))
                }
                Err(e) => return Err(bad_request(400, "invalid_http", format!("malformed HTTP request: {e}"))),
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(None), // idle timeout, reset
        }
    };
    buf.drain(..head_len);

    if req.header("Transfer-Encoding").is_some_and(|v| !v.eq_ignore_ascii_case("identity")) {
        return Err(bad_request(411, "length_required", "chunked request bodies are not supported: send Content-Length"));
    }
    let len = match req.header("Content-Length") {
        None => 0,
        Some(v) => v.parse::<usize>().map_err(|_| bad_request(400, "invalid_http", format!("bad Content-Length {v:?}")))?,
    };
    if len > MAX_BODY {
        return Err(bad_request(413, "request_too_large", format!("the request body ({len} bytes) is larger than {MAX_BODY} bytes")));
    }
    let expects = req.header("Expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if len > buf.len() && expects && stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
        return Ok(None);
    }
    while buf.len() < len {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(None),
        }
    }
    req.body = buf.drain(..len).collect();
    Ok(Some(req))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Where a handler writes its one answer.
pub struct Responder<'a> {
    stream: &'a mut TcpStream,
    minor: u8,
    keep_alive: bool,
    head_only: bool,
    /// an answer was (begun to be) written
    started: bool,
    /// a write failed or a stream was cut short: the connection cannot be reused
    failed: bool,
}

impl<'a> Responder<'a> {
    fn new(stream: &'a mut TcpStream, minor: u8, keep_alive: bool, head_only: bool) -> Responder<'a> {
        Responder { stream, minor, keep_alive, head_only, started: false, failed: false }
    }

    /// Answers `status` with `body`; only the first answer of a request is sent. A client that
    /// has gone is not an error here (the connection is just not reused).
    pub fn send(&mut self, status: u16, content_type: &str, body: &[u8], extra: &[(&str, &str)]) {
        if self.started {
            return;
        }
        self.started = true;
        let mut head =
            format!("HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n", reason(status), body.len());
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !self.keep_alive {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !self.head_only {
            out.extend_from_slice(body);
        }
        if self.stream.write_all(&out).and_then(|()| self.stream.flush()).is_err() {
            self.failed = true;
        }
    }

    pub fn json(&mut self, status: u16, body: &serde_json::Value, extra: &[(&str, &str)]) {
        self.send(status, "application/json", body.to_string().as_bytes(), extra);
    }

    /// An OpenAI error body with its status.
    pub fn error(&mut self, e: &ApiError) {
        let extra: &[(&str, &str)] = if e.status == 401 { &[("WWW-Authenticate", "Bearer")] } else { &[] };
        self.json(e.status, &e.body(), extra);
    }

    /// Whether the client has closed the connection (or reset it) while its request runs: a
    /// look at the socket that neither blocks nor consumes anything. A client that has sent its
    /// next request already (pipelining) is still there.
    pub fn client_gone(&mut self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let gone = match self.stream.peek(&mut [0u8; 1]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
        };
        let _ = self.stream.set_nonblocking(false);
        if gone {
            self.failed = true;
        }
        gone
    }

    /// Starts a 200 `text/event-stream` answer.
    pub fn sse(&mut self) -> io::Result<Sse<'_, 'a>> {
        self.started = true;
        let chunked = self.minor >= 1;
        if !chunked {
            self.keep_alive = false; // HTTP/1.0: the body ends with the connection
        }
        let framing = if chunked { "Transfer-Encoding: chunked\r\n" } else { "Connection: close\r\n" };
        let head = format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n{framing}\r\n");
        if let Err(e) = self.stream.write_all(head.as_bytes()).and_then(|()| self.stream.flush()) {
            self.failed = true;
            return Err(e);
        }
        Ok(Sse { out: self, chunked, ended: false })
    }
}

/// A server-sent event stream; dropped before [`Sse::end`], the connection is not reused.
pub struct Sse<'r, 'a> {
    out: &'r mut Responder<'a>,
    chunked: bool,
    ended: bool,
}

impl Sse<'_, '_> {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(data.len() + 16);
        if self.chunked {
            frame.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            frame.extend_from_slice(data);
            frame.extend_from_slice(b"\r\n");
        } else {
            frame.extend_from_slice(data);
        }
        let r = self.out.stream.write_all(&frame).and_then(|()| self.out.stream.flush());
        if r.is_err() {
            self.out.failed = true;
        }
        r
    }

    /// One `data: …` event; an error means the client is gone.
    pub fn send(&mut self, data: &str) -> io::Result<()> {
        self.write(format!("data: {data}\n\n").as_bytes())
    }

    /// Ends the body (the last chunk on HTTP/1.1).
    pub fn end(mut self) -> io::Result<()> {
        self.ended = true;
        if self.chunked {
            self.write(b"")?; // the zero-length chunk: "0\r\n\r\n"
        }
        Ok(())
    }
}

impl Drop for Sse<'_, '_> {
    fn drop(&mut self) {
        if !self.ended {
            self.out.failed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server whose handler answers "METHOD PATH BODY" (and panics on /panic), on a free port.
    fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Arc<Handler> = Arc::new(|rq: &Request, out: &mut Responder| {
            if rq.path() == "/panic" {
                panic!("a handler bug");
            }
            let body = format!("{} {} {}", rq.method, rq.path(), String::from_utf8_lossy(&rq.body));
            out.send(200, "text/plain", body.as_bytes(), &[]);
        });
        std::thread::spawn(move || serve(listener, handler));
        addr
    }

    /// Sends `raw`, closes the writing side, reads everything until the server closes.
    fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn keep_alive_pipelining_and_bad_requests() {
        let addr = server();
        // two pipelined requests on one connection, bodies by Content-Length
        let out = exchange(addr, b"POST /a?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(out.contains("POST /a abc") && out.contains("GET /b ") && out.contains("Connection: close"), "{out}");
        // refused bodies and heads: an OpenAI error body, then the connection closes
        for (raw, status) in [
            (&b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..], "411"),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", "413"),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", "400"),
            (b"NOT HTTP\r\n\r\n", "400"),
        ] {
            let out = exchange(addr, raw);
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
            assert!(out.contains("\"error\"") && out.contains("\"type\":\"invalid_request_error\""), "{out}");
        }
        // a panicking handler: 500, and the server goes on
        let out = exchange(addr, b"GET /panic HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 500 "), "{out}");
        assert!(exchange(addr, b"GET /c HTTP/1.0\r\n\r\n").contains("GET /c "));
        // HEAD: the length of "HEAD /d ", no body
        let out = exchange(addr, b"HEAD /d HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(out.contains("Content-Length: 8\r\n") && out.ends_with("\r\n\r\n"), "{out:?}");
    }
}
