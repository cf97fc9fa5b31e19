//! Several devices in one process (`wgpt train --devices`): which devices, and the parameter
//! checksum that proves ranks hold identical parameters. The ranks themselves are threads of the
//! ordinary training loop (`train::run_rank`), joined by `comm::ThreadComm`.

use crate::backend::BackendKind;
use crate::error::{Error, Result};

/// `--devices`: entries `N` (device N of `--backend`), `cpu`, `wgpu:N`, `cuda:N` (or `wgpu`,
/// `cuda`: the backend's default device). The same device may be listed twice: it is opened twice.
pub fn parse_devices(list: &str, backend: BackendKind) -> Result<Vec<(BackendKind, Option<usize>)>> {
    let bad = |e: &str, why: &str| Error::flag("--devices", format!("'{e}' in '{list}': {why}"));
    let mut out = Vec::new();
    for e in list.split(',').map(str::trim) {
        let (kind, index) = match e.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None if e.chars().all(|c| c.is_ascii_digit()) && !e.is_empty() => ("", Some(e)),
            None => (e, None),
        };
        let kind = match kind {
            "" => match backend {
                BackendKind::Auto => return Err(bad(e, "a bare index needs --backend wgpu or --backend cuda (or write wgpu:N)")),
                BackendKind::Cpu => return Err(bad(e, "the cpu has no device index; write cpu")),
                k => k,
            },
            "cpu" => BackendKind::Cpu,
            "wgpu" => BackendKind::Wgpu,
            "cuda" => BackendKind::Cuda,
            _ => return Err(bad(e, "expected N, cpu, wgpu:N or cuda:N")),
        };
        let index = match index {
            None => None,
            Some(_) if kind == BackendKind::Cpu => return Err(bad(e, "the cpu has no device index; write cpu")),
            Some(i) => Some(i.parse::<usize>().map_err(|_| bad(e, "the index is not a number"))?),
        };
        out.push((kind, index));
    }
    if out.len() < 2 {
        return Err(Error::flag("--devices", format!("'{list}': list at least two devices (one device needs no --devices)")));
    }
    Ok(out)
}

/// 64-bit FNV-1a over the f32 bits: equal for bit-identical parameters.
pub fn checksum(flat: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in flat {
        for b in x.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists() {
        use BackendKind::*;
        assert_eq!(parse_devices("0,1", Wgpu).unwrap(), vec![(Wgpu, Some(0)), (Wgpu, Some(1))]);
        assert_eq!(parse_devices("wgpu:0, cpu", Auto).unwrap(), vec![(Wgpu, Some(0)), (Cpu, None)]);
        assert_eq!(parse_devices("cuda:1,cuda:1", Cpu).unwrap(), vec![(Cuda, Some(1)), (Cuda, Some(1))]);
        for (l, b) in [("0,1", Auto), ("0", Wgpu), ("cpu:0,cpu", Auto), ("tpu:0,cpu", Auto), ("wgpu:x,cpu", Auto)] {
            assert!(parse_devices(l, b).unwrap_err().to_string().starts_with("--devices: "), "{l}");
        }
        assert_ne!(checksum(&[1.0, 2.0]), checksum(&[2.0, 1.0]));
    }
}
