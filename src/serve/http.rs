//! The HTTP side over tiny_http: request bodies with a size limit, JSON answers, and server-sent
//! events written straight to the socket (chunked on HTTP/1.1, so the connection can be reused;
//! until the close on HTTP/1.0), where a failed write means the client has gone.

use super::api::ApiError;
use std::io::{self, Read, Write};
use tiny_http::{Header, Request, Response};

/// Request bodies larger than this are refused (413).
pub const MAX_BODY: usize = 1 << 20;

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid header")
}

/// The body, at most [`MAX_BODY`] bytes.
pub fn read_body(rq: &mut Request) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError::new(413, "invalid_request_error", "request_too_large", None, format!("the request body is larger than {MAX_BODY} bytes"));
    if rq.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    rq.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::new(400, "invalid_request_error", "invalid_body", None, format!("reading the request body failed: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

/// Answers `status` with a JSON body. A client that has gone is not an error here.
pub fn respond_json(rq: Request, status: u16, body: &serde_json::Value, extra: &[(&str, &str)]) {
    let mut r = Response::from_data(body.to_string().into_bytes()).with_status_code(status).with_header(header("Content-Type", "application/json"));
    for (k, v) in extra {
        r = r.with_header(header(k, v));
    }
    let _ = rq.respond(r);
}

/// Answers with an OpenAI error body.
pub fn respond_error(rq: Request, e: &ApiError) {
    let extra: &[(&str, &str)] = match e.status {
        401 => &[("WWW-Authenticate", "Bearer")],
        _ => &[],
    };
    respond_json(rq, e.status, &e.body(), extra);
}

/// Answers `status` with a plain-text body.
pub fn respond_text(rq: Request, status: u16, body: String, content_type: &str) {
    let _ = rq.respond(Response::from_string(body).with_status_code(status).with_header(header("Content-Type", content_type)));
}

/// A server-sent event stream on the request's socket.
pub struct Sse {
    w: Box<dyn Write + Send>,
    chunked: bool,
}

impl Sse {
    /// Takes the socket and writes the 200 status line and headers.
    pub fn start(rq: Request) -> io::Result<Sse> {
        let chunked = *rq.http_version() >= tiny_http::HTTPVersion(1, 1);
        let mut w = rq.into_writer();
        let head = if chunked {
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        } else {
            "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        };
        w.write_all(head.as_bytes())?;
        w.flush()?;
        Ok(Sse { w, chunked })
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.chunked {
            write!(self.w, "{:x}\r\n", data.len())?;
            self.w.write_all(data)?;
            self.w.write_all(b"\r\n")?;
        } else {
            self.w.write_all(data)?;
        }
        self.w.flush()
    }

    /// One `data: …` event; an error means the client is gone.
    pub fn send(&mut self, data: &str) -> io::Result<()> {
        self.write(format!("data: {data}\n\n").as_bytes())
    }

    /// Ends the body (the last chunk on HTTP/1.1).
    pub fn end(mut self) -> io::Result<()> {
        if self.chunked {
            self.w.write_all(b"0\r\n\r\n")?;
        }
        self.w.flush()
    }
}
