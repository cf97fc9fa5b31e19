//! How the ranks of a world without MPI find each other: rank 0's few bytes (its NCCL unique id)
//! reach every other rank, through a file in a directory they all see (llm.c's `fs` method) or
//! a TCP connection to `MASTER_ADDR:MASTER_PORT` (torchrun's variables, llm.c's `tcp` method).
//! Nothing else goes through it: once NCCL is joined, it carries every collective.
//!
//! `--dist-init` chooses: `auto` (MPI where an MPI launcher started the ranks; `tcp` for CUDA
//! ranks started by torchrun or given `MASTER_ADDR`/`MASTER_PORT`), `mpi`, `fs:DIR`, `tcp` or
//! `tcp:HOST:PORT`. Every wait here is bounded by `--dist-timeout`.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// `--dist-init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DistInit {
    Auto,
    Mpi,
    /// a directory every rank sees (a shared file system across nodes)
    Fs(PathBuf),
    /// rank 0 listens at HOST:PORT; None: `MASTER_ADDR`/`MASTER_PORT`
    Tcp(Option<(String, u16)>),
}

impl DistInit {
    /// clap's parser: `auto`, `mpi`, `fs:DIR`, `tcp` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> std::result::Result<DistInit, String> {
        match s {
            "auto" => return Ok(DistInit::Auto),
            "mpi" => return Ok(DistInit::Mpi),
            "tcp" => return Ok(DistInit::Tcp(None)),
            _ => {}
        }
        if let Some(dir) = s.strip_prefix("fs:") {
            if dir.is_empty() {
                return Err("fs: needs a directory every rank sees, e.g. fs:$HOME/.wgpt-rendezvous".into());
            }
            return Ok(DistInit::Fs(PathBuf::from(dir)));
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            let (host, port) = hp.rsplit_once(':').ok_or_else(|| format!("{s}: give tcp:HOST:PORT, e.g. tcp:node01:29500"))?;
            let port = port.parse::<u16>().map_err(|_| format!("{s}: the port '{port}' is not a number from 0 to 65535"))?;
            if host.is_empty() {
                return Err(format!("{s}: the host is empty"));
            }
            return Ok(DistInit::Tcp(Some((host.to_string(), port))));
        }
        Err(format!("'{s}': give auto, mpi, fs:DIR, tcp or tcp:HOST:PORT"))
    }

    /// The TCP address to use: the flag's, else `MASTER_ADDR`/`MASTER_PORT`.
    pub fn tcp_addr(&self, env: &HashMap<String, String>) -> Result<(String, u16)> {
        if let DistInit::Tcp(Some(hp)) = self {
            return Ok(hp.clone());
        }
        let addr = env.get("MASTER_ADDR").filter(|v| !v.is_empty());
        let port = env.get("MASTER_PORT").filter(|v| !v.is_empty());
        match (addr, port) {
            (Some(a), Some(p)) => {
                let port = p.parse::<u16>().map_err(|_| Error::flag("--dist-init", format!("tcp: MASTER_PORT={p} is not a port number")))?;
                Ok((a.clone(), port))
            }
            _ => Err(Error::flag("--dist-init", "tcp: set MASTER_ADDR and MASTER_PORT (rank 0's host and a free port), or give tcp:HOST:PORT")),
        }
    }
}

impl std::fmt::Display for DistInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DistInit::Auto => write!(f, "auto"),
            DistInit::Mpi => write!(f, "mpi"),
            DistInit::Fs(d) => write!(f, "fs:{}", d.display()),
            DistInit::Tcp(None) => write!(f, "tcp"),
            DistInit::Tcp(Some((h, p))) => write!(f, "tcp:{h}:{p}"),
        }
    }
}

const MAGIC: &[u8; 8] = b"WGPTRDV1";
/// A file older than this before the rank started is a leftover of an earlier run.
const STALE: Duration = Duration::from_secs(300);

/// What names this job's file, so two jobs sharing a directory do not meet: Slurm's job and step,
/// torchrun's run id, or `WGPT_RUN_ID`; "0" without any.
pub fn job_key(env: &HashMap<String, String>) -> String {
    let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let key = match (get("SLURM_JOB_ID"), get("SLURM_STEP_ID")) {
        (Some(j), Some(s)) => format!("{j}.{s}"),
        (Some(j), None) => j,
        _ => get("TORCHELASTIC_RUN_ID").or_else(|| get("WGPT_RUN_ID")).unwrap_or_else(|| "0".into()),
    };
    key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// The file of `fs:DIR` for this job.
pub fn fs_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("wgpt-rendezvous-{key}.bin"))
}

/// Rank 0's `blob` on every rank of a world of `size` (rank 0 passes it, the others None), through
/// `fs` or `tcp`. Rank 0's file (fs) stays until `finish_fs` is called, once every rank has
/// read it (they have when NCCL's communicator is made).
pub fn share(method: &DistInit, env: &HashMap<String, String>, rank: usize, size: usize, blob: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
    let started = SystemTime::now();
    match method {
        DistInit::Fs(dir) => {
            let path = fs_path(dir, &job_key(env));
            match blob {
                Some(b) => fs_publish(&path, size, b).map(|()| b.to_vec()),
                None => fs_wait(&path, size, started, timeout),
            }
        }
        DistInit::Tcp(_) => {
            let (host, port) = method.tcp_addr(env)?;
            match blob {
                Some(b) => tcp_serve(&host, port, rank, size, b, timeout).map(|()| b.to_vec()),
                None => tcp_fetch(&host, port, rank, size, timeout),
            }
        }
        DistInit::Auto | DistInit::Mpi => Err(Error::Internal(format!("rendezvous::share through {method}"))),
    }
}

/// Rank 0, once every rank has joined: remove the `fs` file (a later job must not read it).
pub fn finish_fs(method: &DistInit, env: &HashMap<String, String>) {
    if let DistInit::Fs(dir) = method {
        let _ = std::fs::remove_file(fs_path(dir, &job_key(env)));
    }
}

fn frame(size: usize, blob: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend((size as u32).to_le_bytes());
    out.extend((blob.len() as u32).to_le_bytes());
    out.extend(blob);
    out
}

/// The blob of a frame (None: not a whole frame yet); Err when it is another world's.
fn unframe(bytes: &[u8], size: usize, what: &str) -> Result<Option<Vec<u8>>> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Ok(None);
    }
    let n = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    if n != size {
        return Err(Error::Dist(format!("{what}: rank 0 started a world of {n} ranks, this rank is in a world of {size}: another job's rendezvous? (set WGPT_RUN_ID to tell jobs apart)")));
    }
    Ok((bytes.len() >= 16 + len).then(|| bytes[16..16 + len].to_vec()))
}

fn fs_publish(path: &Path, size: usize, blob: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // written whole and renamed into place: a reader never sees half of it
    crate::atomic::write_atomic(path, &frame(size, blob))
}

fn fs_wait(path: &Path, size: usize, started: SystemTime, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let what = format!("--dist-init fs: {}", path.display());
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            let fresh = std::fs::metadata(path).and_then(|m| m.modified()).map_or(true, |t| t + STALE >= started);
            if fresh {
                if let Some(b) = unframe(&bytes, size, &what)? {
                    return Ok(b);
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Dist(format!(
                "{what}: rank 0 did not write it within {} s (--dist-timeout): is rank 0 running, and is the directory shared by every node?",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rank 0: listen at `host:port`, answer every other rank with the blob, return once all
/// `size - 1` have it.
fn tcp_serve(host: &str, port: u16, rank: usize, size: usize, blob: &[u8], timeout: Duration) -> Result<()> {
    debug_assert_eq!(rank, 0);
    let what = format!("--dist-init tcp: {host}:{port}");
    // listen on every interface of this host at the port (MASTER_ADDR names this host as the
    // others reach it, which need not be an address this host can bind)
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| Error::Dist(format!("{what}: rank 0 cannot listen on port {port}: {e}; choose another MASTER_PORT")))?;
    listener.set_nonblocking(true).map_err(|e| Error::Dist(format!("{what}: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut seen = vec![false; size];
    seen[0] = true;
    let reply = frame(size, blob);
    while seen.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).ok();
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut hello = [0u8; 16];
                if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    // not a rank of ours (a port scan, a health check): ignore it
                    continue;
                }
                let r = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
                let n = u32::from_le_bytes(hello[12..16].try_into().unwrap()) as usize;
                if n != size || r == 0 || r >= size {
                    // the frame names this world's size: that rank stops with the reason too
                    let _ = s.write_all(&frame(size, &[]));
                    return Err(Error::Dist(format!("{what}: {peer} says rank {r} of {n}, this is rank 0 of {size}: another job on this port?")));
                }
                s.write_all(&reply).map_err(|e| Error::Dist(format!("{what}: answering rank {r} ({peer}): {e}")))?;
                seen[r] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (0..size).filter(|&r| !seen[r]).map(|r| r.to_string()).collect();
                    return Err(Error::Dist(format!(
                        "{what}: ranks {} did not connect within {} s (--dist-timeout)",
                        missing.join(","),
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::Dist(format!("{what}: {e}"))),
        }
    }
    Ok(())
}

/// Another rank: connect to rank 0 (again and again until it listens) and read the blob.
fn tcp_fetch(host: &str, port: u16, rank: usize, size: usize, timeout: Duration) -> Result<Vec<u8>> {
    let what = format!("--dist-init tcp: {host}:{port}");
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer");
    loop {
        let addrs: Vec<_> = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => return Err(Error::Dist(format!("{what}: cannot resolve {host}: {e}"))),
        };
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)))).ok();
                    let mut hello = MAGIC.to_vec();
                    hello.extend((rank as u32).to_le_bytes());
                    hello.extend((size as u32).to_le_bytes());
                    s.write_all(&hello).map_err(|e| Error::Dist(format!("{what}: {e}")))?;
                    let mut bytes = Vec::new();
                    match s.read_to_end(&mut bytes) {
                        Ok(_) => match unframe(&bytes, size, &what)? {
                            Some(b) => return Ok(b),
                            None => last = format!("{addr} answered {} bytes that are not rank 0's", bytes.len()),
                        },
                        Err(e) => last = format!("{addr}: {e}"),
                    }
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Dist(format!(
                "{what}: rank {rank} could not reach rank 0 within {} s (--dist-timeout; last: {last})",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgpt-rdv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    /// Every rank of a world of `size`, each on its own thread; rank 0 starts `delay` after the others.
    fn world(method: DistInit, e: HashMap<String, String>, size: usize, delay: Duration) -> Vec<Result<Vec<u8>>> {
        let blob: Vec<u8> = (0..128u8).map(|i| i.wrapping_mul(37)).collect();
        let hs: Vec<_> = (0..size)
            .map(|r| {
                let (m, e, b) = (method.clone(), e.clone(), blob.clone());
                std::thread::spawn(move || {
                    if r == 0 {
                        std::thread::sleep(delay);
                    }
                    share(&m, &e, r, size, (r == 0).then_some(&b[..]), Duration::from_secs(20))
                })
            })
            .collect();
        let out: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        for o in &out {
            assert_eq!(o.as_ref().unwrap(), &blob);
        }
        out
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(DistInit::parse("auto"), Ok(DistInit::Auto));
        assert_eq!(DistInit::parse("mpi"), Ok(DistInit::Mpi));
        assert_eq!(DistInit::parse("tcp"), Ok(DistInit::Tcp(None)));
        assert_eq!(DistInit::parse("fs:/scratch/x"), Ok(DistInit::Fs("/scratch/x".into())));
        assert_eq!(DistInit::parse("tcp:node01:29500"), Ok(DistInit::Tcp(Some(("node01".into(), 29500)))));
        for bad in ["fs:", "tcp:node01", "tcp:node01:99999", "tcp::5", "nccl"] {
            assert!(DistInit::parse(bad).is_err(), "{bad}");
        }
        for s in ["auto", "mpi", "tcp", "fs:/a/b", "tcp:h:1"] {
            assert_eq!(DistInit::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn tcp_address_from_flag_or_master_vars() {
        let e = env(&[("MASTER_ADDR", "10.1.2.3"), ("MASTER_PORT", "29500")]);
        assert_eq!(DistInit::Tcp(None).tcp_addr(&e).unwrap(), ("10.1.2.3".into(), 29500));
        assert_eq!(DistInit::Tcp(Some(("h".into(), 7))).tcp_addr(&e).unwrap(), ("h".into(), 7));
        let msg = DistInit::Tcp(None).tcp_addr(&env(&[])).unwrap_err().to_string();
        assert!(msg.contains("MASTER_ADDR") && msg.contains("--dist-init"), "{msg}");
        assert!(DistInit::Tcp(None).tcp_addr(&env(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "x")])).is_err());
    }

    #[test]
    fn job_keys() {
        assert_eq!(job_key(&env(&[("SLURM_JOB_ID", "77"), ("SLURM_STEP_ID", "3")])), "77.3");
        assert_eq!(job_key(&env(&[("TORCHELASTIC_RUN_ID", "a/b c")])), "a_b_c");
        assert_eq!(job_key(&env(&[("WGPT_RUN_ID", "r1")])), "r1");
        assert_eq!(job_key(&env(&[])), "0");
    }

    #[test]
    fn fs_reaches_every_rank_whoever_starts_first() {
        let d = tmp("fs");
        world(DistInit::Fs(d.clone()), env(&[("WGPT_RUN_ID", "t1")]), 3, Duration::from_millis(300));
        assert!(fs_path(&d, "t1").exists(), "the file stays until rank 0 calls finish_fs");
        finish_fs(&DistInit::Fs(d.clone()), &env(&[("WGPT_RUN_ID", "t1")]));
        assert!(!fs_path(&d, "t1").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn fs_ignores_a_leftover_and_refuses_another_world() {
        let d = tmp("stale");
        std::fs::create_dir_all(&d).unwrap();
        let p = fs_path(&d, "0");
        std::fs::write(&p, frame(2, b"old")).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
        drop(f);
        let msg = fs_wait(&p, 2, SystemTime::now(), Duration::from_millis(300)).unwrap_err().to_string();
        assert!(msg.contains("did not write it") && msg.contains(&p.display().to_string()), "{msg}");
        std::fs::write(&p, frame(4, b"other")).unwrap();
        let msg = fs_wait(&p, 2, SystemTime::now(), Duration::from_millis(300)).unwrap_err().to_string();
        assert!(msg.contains("world of 4"), "{msg}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn tcp_reaches_every_rank_whoever_starts_first() {
        let port = free_port().to_string();
        world(DistInit::Tcp(None), env(&[("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)]), 3, Duration::from_millis(500));
        let port = free_port();
        world(DistInit::Tcp(Some(("localhost".into(), port))), env(&[]), 2, Duration::ZERO);
    }

    #[test]
    fn tcp_waits_are_bounded_and_name_the_missing() {
        let port = free_port();
        let t0 = Instant::now();
        let msg = tcp_fetch("127.0.0.1", port, 1, 2, Duration::from_millis(400)).unwrap_err().to_string();
        assert!(msg.contains("could not reach rank 0") && msg.contains(&port.to_string()), "{msg}");
        let msg = tcp_serve("127.0.0.1", port, 0, 3, b"x", Duration::from_millis(400)).unwrap_err().to_string();
        assert!(msg.contains("ranks 1,2 did not connect"), "{msg}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn tcp_refuses_another_world_size() {
        let port = free_port();
        let server = std::thread::spawn(move || tcp_serve("127.0.0.1", port, 0, 2, b"x", Duration::from_secs(20)));
        let msg = tcp_fetch("127.0.0.1", port, 1, 3, Duration::from_secs(20)).unwrap_err().to_string();
        let smsg = server.join().unwrap().unwrap_err().to_string();
        assert!(smsg.contains("rank 1 of 3"), "{smsg}");
        assert!(msg.contains("world of 2") && msg.contains("world of 3"), "{msg}");
    }
}
