//! Typed errors. Every failure a user can cause ends up here and is printed by `main` as one line
//! on stderr (no panics, no backtraces). Each variant names the file or the flag to change.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened/read/written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A file exists but its contents are wrong: bad magic, unsupported version, truncated, empty.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// A command-line value is invalid; `flag` is spelled as the user types it (e.g. "--seq-len").
    #[error("{flag}: {msg}")]
    Flag { flag: String, msg: String },

    /// Bad data content (e.g. token id >= vocab size), naming where it came from.
    #[error("{0}")]
    Data(String),

    /// A backend or device is not available here (missing driver, no adapter...), with what to use instead.
    #[error("{0}")]
    Unavailable(String),

    /// The step does not fit in device memory; the message says what to change.
    #[error("{0}")]
    OutOfMemory(String),

    /// A backend failed at run time (shader compile error, driver error...).
    #[error("{backend}: {msg}")]
    Backend { backend: String, msg: String },

    /// The backend cannot run what the graph asks for (a dtype it has no kernels for...).
    #[error("{backend}: {msg}")]
    Unsupported { backend: String, msg: String },

    /// The ranks of a data-parallel job could not work together: a peer failed, died or hangs,
    /// or the ranks disagree (parameters out of sync).
    #[error("{0}")]
    Dist(String),

    /// A broken invariant inside wgpt (a graph whose launches break the kernel contract...):
    /// a bug, never the user's input.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Who can fix an error: what a CLI prints the same way but a server answers differently
/// (400 for `User`, 500/503 for the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// bad input: a file, a flag, a request, data
    User,
    /// the machine: a missing driver or device, out of memory, a device failure
    Device,
    /// a bug in wgpt
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::Format { .. } | Error::Flag { .. } | Error::Data(_) => ErrorKind::User,
            Error::Unavailable(_) | Error::OutOfMemory(_) | Error::Backend { .. } | Error::Unsupported { .. } | Error::Dist(_) => {
                ErrorKind::Device
            }
            Error::Internal(_) => ErrorKind::Internal,
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    pub fn flag(flag: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Flag { flag: flag.into(), msg: msg.into() }
    }
    pub fn backend(backend: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Backend { backend: backend.into(), msg: msg.into() }
    }
}
