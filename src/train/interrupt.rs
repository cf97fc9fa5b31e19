//! Ctrl-C (SIGINT) and SIGTERM during `wgpt train`. The first one asks the training loop to stop
//! at the end of the current step: it writes a checkpoint when `--out` is set and wgpt exits with
//! 128 + the signal (130 for Ctrl-C, 143 for SIGTERM, as a shell reports a process killed by it).
//! A second one ends the process at once, from the signal handler itself (`_exit`, nothing else
//! runs), with the same status: a checkpoint being written then is left as a temporary file, and
//! the newest complete one (atomic writes, `DONE_` last) is still what `--resume` takes.
//!
//! The handlers only store to atomics (async-signal-safe); the loop polls [`requested`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

pub use signal_hook::consts::signal::{SIGINT, SIGTERM};

struct Flags {
    /// set by the first signal; arms the immediate exit of the second
    pending: Arc<AtomicBool>,
    /// the signal number that arrived last (0 = none)
    which: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Option<Flags>> = OnceLock::new();

/// The exit status for a run stopped by `signal`: 128 + its number.
pub fn exit_status(signal: i32) -> i32 {
    128 + signal
}

/// Install the handlers (once per process) and clear any earlier request (a library user may
/// train twice in one process). If the system refuses them, a warning is printed and signals keep
/// their default action (the process dies, as before).
pub fn install() {
    let flags = FLAGS.get_or_init(|| {
        let flags = Flags { pending: Arc::new(AtomicBool::new(false)), which: Arc::new(AtomicUsize::new(0)) };
        let register = |sig: i32| -> std::io::Result<()> {
            // order matters: the conditional exit must look at the flag before the first signal sets it
            signal_hook::flag::register_conditional_shutdown(sig, exit_status(sig), flags.pending.clone())?;
            signal_hook::flag::register_usize(sig, flags.which.clone(), sig as usize)?;
            signal_hook::flag::register(sig, flags.pending.clone())?;
            Ok(())
        };
        match register(SIGINT).and_then(|()| register(SIGTERM)) {
            Ok(()) => Some(flags),
            Err(e) => {
                eprintln!("warning: cannot handle Ctrl-C ({e}); it will stop training without a checkpoint");
                None
            }
        }
    });
    if let Some(f) = flags {
        f.pending.store(false, Ordering::SeqCst);
        f.which.store(0, Ordering::SeqCst);
    }
}

/// The signal that asked training to stop, if one has arrived since [`install`].
pub fn requested() -> Option<i32> {
    let flags = FLAGS.get()?.as_ref()?;
    if !flags.pending.load(Ordering::SeqCst) {
        return None;
    }
    match flags.which.load(Ordering::SeqCst) {
        0 => Some(SIGINT),
        s => Some(s as i32),
    }
}

/// Name of a signal for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT (Ctrl-C)",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
