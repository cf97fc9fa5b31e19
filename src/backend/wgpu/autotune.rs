//! Matmul autotuning: the first time a matmul shape is compiled on an adapter, every matmul mode
//! it can run (`MatmulMode`: 64×64 tiles, 128×128 tiles, subgroup shuffles) is timed on that exact
//! launch, on scratch buffers of the same sizes and offsets, and the fastest is kept for the shape
//! (forward and backward separately) in a cache file per adapter and driver, so a restart does
//! not tune again. A forced mode (`WGPT_WGPU_MATMUL`) turns tuning off.
//!
//! `WGPT_WGPU_AUTOTUNE=1|0` turns it on or off; by default it is on for GPUs and off for software
//! adapters such as lavapipe (whose few cores make tuning slow and whose best mode is known).
//! The cache is a text file, one line per shape: `fwd|bwd N C OC MODE`. A line that does not
//! parse is ignored with one warning (the shape is tuned again and the file rewritten).

use super::compile::MatmulMode;
use crate::graph::Kernel;
use std::collections::HashMap;
use std::path::PathBuf;

/// A matmul's shape: (backward, n, c, oc).
pub type Shape = (bool, usize, usize, usize);

/// The shape of a matmul launch, None for other kernels.
pub fn shape_of(k: &Kernel) -> Option<Shape> {
    match *k {
        Kernel::MatmulForward { n, c, oc, .. } => Some((false, n, c, oc)),
        Kernel::MatmulBackward { n, c, oc, .. } => Some((true, n, c, oc)),
        _ => None,
    }
}

pub fn mode_name(m: MatmulMode) -> &'static str {
    match m {
        MatmulMode::Tiled => "tiled",
        MatmulMode::TiledLarge => "tiled-large",
        MatmulMode::Subgroup => "subgroup",
    }
}

fn mode_from(s: &str) -> Option<MatmulMode> {
    match s {
        "tiled" => Some(MatmulMode::Tiled),
        "tiled-large" => Some(MatmulMode::TiledLarge),
        "subgroup" => Some(MatmulMode::Subgroup),
        _ => None,
    }
}

/// The tuned modes of one adapter and where they are kept.
pub struct Tuner {
    /// the cache file (None: kept in memory only, e.g. without a cache directory)
    pub path: Option<PathBuf>,
    pub modes: HashMap<Shape, MatmulMode>,
}

/// The cache file's name for an adapter: a hash of everything that could change the timings.
pub fn cache_name(info: &wgpu::AdapterInfo) -> String {
    let key = format!(
        "{}|{:?}|{:x}|{:x}|{}|{}|{}",
        info.name,
        info.backend,
        info.vendor,
        info.device,
        info.driver,
        info.driver_info,
        env!("CARGO_PKG_VERSION")
    );
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("matmul-{h:016x}.txt")
}

impl Tuner {
    /// Read `path` (absent: nothing tuned yet). Lines that do not parse are dropped with one
    /// warning; the modes in `allowed` only are kept (a mode this adapter lost is tuned again).
    pub fn load(path: Option<PathBuf>, allowed: &[MatmulMode]) -> Tuner {
        let mut modes = HashMap::new();
        if let Some(p) = &path {
            if let Ok(text) = std::fs::read_to_string(p) {
                let mut bad = 0;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match parse_line(line) {
                        Some((shape, m)) if allowed.contains(&m) => {
                            modes.insert(shape, m);
                        }
                        _ => bad += 1,
                    }
                }
                if bad > 0 {
                    eprintln!("warning: {}: {bad} unreadable line(s) ignored; those matmul shapes will be tuned again", p.display());
                }
            }
        }
        Tuner { path, modes }
    }

    /// Write every tuned shape (atomically; a failure is the cache's usual warning).
    pub fn save(&self) {
        let Some(p) = &self.path else { return };
        let mut lines: Vec<String> = self
            .modes
            .iter()
            .map(|(&(bwd, n, c, oc), &m)| format!("{} {n} {c} {oc} {}", if bwd { "bwd" } else { "fwd" }, mode_name(m)))
            .collect();
        lines.sort();
        crate::cache::store(p, (lines.join("\n") + "\n").as_bytes());
    }
}

fn parse_line(line: &str) -> Option<(Shape, MatmulMode)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 5 {
        return None;
    }
    let bwd = match f[0] {
        "fwd" => false,
        "bwd" => true,
        _ => return None,
    };
    let n = |s: &str| s.parse::<usize>().ok().filter(|&v| v > 0);
    Some(((bwd, n(f[1])?, n(f[2])?, n(f[3])?), mode_from(f[4])?))
}

/// Whether tuning is on for this adapter: `WGPT_WGPU_AUTOTUNE`, else on for GPUs only; never
/// with a forced `WGPT_WGPU_MATMUL`.
pub fn enabled(info: &wgpu::AdapterInfo) -> bool {
    if std::env::var_os("WGPT_WGPU_MATMUL").is_some() {
        return false;
    }
    match std::env::var("WGPT_WGPU_AUTOTUNE").ok().as_deref() {
        Some("1") => true,
        Some("0") => false,
        _ => info.device_type != wgpu::DeviceType::Cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_bad_ones_are_dropped() {
        assert_eq!(parse_line("fwd 64 768 2304 tiled-large"), Some(((false, 64, 768, 2304), MatmulMode::TiledLarge)));
        assert_eq!(parse_line("bwd 1 2 3 subgroup"), Some(((true, 1, 2, 3), MatmulMode::Subgroup)));
        for bad in ["fwd 64 768 tiled", "sideways 1 2 3 tiled", "fwd 0 2 3 tiled", "fwd 1 2 3 fastest", "fwd x 2 3 tiled", "\u{0}\u{1}"] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
        let dir = std::env::temp_dir().join(format!("wgpt-tune-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.txt");
        std::fs::write(&p, "fwd 8 8 8 subgroup\ngarbage here\nbwd 8 8 8 tiled-large\n").unwrap();
        // tiled-large not allowed on this "adapter": dropped like garbage
        let t = Tuner::load(Some(p.clone()), &[MatmulMode::Tiled, MatmulMode::Subgroup]);
        assert_eq!(t.modes.len(), 1);
        assert_eq!(t.modes[&(false, 8, 8, 8)], MatmulMode::Subgroup);
        t.save();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "fwd 8 8 8 subgroup\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
