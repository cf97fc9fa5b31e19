//! How the global micro-batch (B sequences) is divided among ranks: evenly, as the user lists it
//! (`--batch-split 1,3`), or in proportion to each device's measured speed (`auto`), capped by
//! what fits each device. Rank r always takes the contiguous rows `offset(r)..offset(r)+b_r` of
//! the batch a single device would read, so any split trains on exactly the same tokens.

use crate::error::{Error, Result};

/// `--batch-split`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchSplit {
    /// B divided as evenly as possible (the first B mod N ranks take one more)
    Even,
    /// time each rank's device and split in proportion to tokens/s
    Auto,
    /// rank r's micro-batch is `list[r]`; B is their sum
    List(Vec<usize>),
}

impl BatchSplit {
    pub fn parse(s: &str) -> std::result::Result<BatchSplit, String> {
        match s.trim() {
            "" | "even" => Ok(BatchSplit::Even),
            "auto" => Ok(BatchSplit::Auto),
            l => {
                let v: std::result::Result<Vec<usize>, _> = l.split(',').map(|x| x.trim().parse::<usize>()).collect();
                match v {
                    Ok(v) if !v.is_empty() && v.iter().all(|&b| b > 0) => Ok(BatchSplit::List(v)),
                    _ => Err(format!("'{s}': expected even, auto or a list of micro-batch sizes ≥ 1 per rank, e.g. 1,3")),
                }
            }
        }
    }
}

impl std::fmt::Display for BatchSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSplit::Even => f.write_str("even"),
            BatchSplit::Auto => f.write_str("auto"),
            BatchSplit::List(v) => f.write_str(&join(v)),
        }
    }
}

/// "1,3"
pub fn join(v: &[usize]) -> String {
    v.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")
}

/// B sequences over `n` ranks as evenly as possible; every rank needs at least one.
pub fn even(b: usize, n: usize) -> Result<Vec<usize>> {
    if b < n {
        return Err(Error::flag("--batch", format!("{b} sequences cannot be split over {n} ranks (each needs at least one); use --batch {n} or more")));
    }
    Ok((0..n).map(|r| b / n + usize::from(r < b % n)).collect())
}

/// B sequences in proportion to `speeds` (tokens/s per rank), each rank at least 1 and at most
/// `caps[r]` (what fits its memory), by largest remainders; ties go to the lower rank, so every
/// rank computes the same split from the same gathered numbers.
pub fn proportional(b: usize, speeds: &[f64], caps: &[usize]) -> Result<Vec<usize>> {
    let n = speeds.len();
    let cap_total: usize = caps.iter().sum();
    if b < n || cap_total < b {
        return Err(Error::flag(
            "--batch-split",
            format!("auto: {b} sequences do not fit {n} ranks (at most {} per rank fit: {}); lower --batch and raise --total-batch", join(caps), cap_total),
        ));
    }
    let total: f64 = speeds.iter().map(|s| s.max(1e-9)).sum();
    let ideal: Vec<f64> = speeds.iter().map(|s| b as f64 * s.max(1e-9) / total).collect();
    let mut split: Vec<usize> = (0..n).map(|r| (ideal[r].floor() as usize).clamp(1, caps[r].max(1))).collect();
    // then one sequence at a time: to the open rank furthest below its share, or from the rank
    // furthest above it (ties to the lower rank)
    loop {
        let sum: usize = split.iter().sum();
        let gap = |r: usize| ideal[r] - split[r] as f64;
        if sum < b {
            let r = (0..n).filter(|&r| split[r] < caps[r]).fold(None, |m: Option<usize>, r| match m {
                Some(q) if gap(q) >= gap(r) => Some(q),
                _ => Some(r),
            });
            split[r.expect("cap_total >= b")] += 1;
        } else if sum > b {
            let r = (0..n).filter(|&r| split[r] > 1).fold(None, |m: Option<usize>, r| match m {
                Some(q) if gap(q) <= gap(r) => Some(q),
                _ => Some(r),
            });
            split[r.expect("b >= n")] -= 1;
        } else {
            break;
        }
    }
    Ok(split)
}

/// When the ranks together fit fewer than `b` sequences per micro-step (`fit`, the sum of what
/// each device fits): the largest global micro-batch d that divides `b`, with at least one
/// sequence per rank, and the factor b/d by which gradient accumulation grows, so the tokens per
/// optimiser step stay the same. None when no such d exists.
pub fn fit_by_accumulation(b: usize, fit: usize, ranks: usize) -> Option<(usize, usize)> {
    if fit >= b {
        return Some((b, 1));
    }
    (ranks..=fit.min(b)).rev().find(|d| b % d == 0).map(|d| (d, b / d))
}

/// The first row of rank r: the sum of the micro-batches before it.
pub fn offset(split: &[usize], r: usize) -> usize {
    split[..r].iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_even() {
        assert_eq!(BatchSplit::parse("auto"), Ok(BatchSplit::Auto));
        assert_eq!(BatchSplit::parse("1, 3"), Ok(BatchSplit::List(vec![1, 3])));
        assert!(BatchSplit::parse("1,0").is_err());
        assert!(BatchSplit::parse("x").is_err());
        assert_eq!(even(4, 2).unwrap(), vec![2, 2]);
        assert_eq!(even(5, 3).unwrap(), vec![2, 2, 1]);
        assert!(even(1, 2).unwrap_err().to_string().contains("--batch"));
        assert_eq!(offset(&[1, 3, 2], 2), 4);
    }

    #[test]
    fn what_does_not_fit_becomes_accumulation() {
        assert_eq!(fit_by_accumulation(16, 40, 2), Some((16, 1)));
        // 16 sequences, the two devices fit 5 + 4 = 9: micro-batch 8, accumulation ×2
        assert_eq!(fit_by_accumulation(16, 9, 2), Some((8, 2)));
        assert_eq!(fit_by_accumulation(12, 5, 3), Some((4, 3)));
        // 7 is prime: only 7 itself divides it, and it does not fit
        assert_eq!(fit_by_accumulation(7, 6, 2), None);
        assert_eq!(fit_by_accumulation(8, 1, 2), None);
    }

    #[test]
    fn proportional_follows_speed_within_caps() {
        // a card 3× faster takes 3/4 of the batch
        assert_eq!(proportional(8, &[100.0, 300.0], &[8, 8]).unwrap(), vec![2, 6]);
        // ... unless it does not fit: the rest goes to the other
        assert_eq!(proportional(8, &[100.0, 300.0], &[8, 4]).unwrap(), vec![4, 4]);
        // every rank keeps at least one sequence, and the sum is always B
        let s = proportional(5, &[1.0, 1000.0, 1.0], &[5, 5, 5]).unwrap();
        assert_eq!((s[0], s[2], s.iter().sum::<usize>()), (1, 1, 5));
        for b in 3..40 {
            let s = proportional(b, &[1.0, 2.5, 7.0], &[b, 6, b]).unwrap();
            assert_eq!(s.iter().sum::<usize>(), b, "{b}: {s:?}");
            assert!(s[1] <= 6 && s.iter().all(|&x| x >= 1));
        }
        assert!(proportional(9, &[1.0, 1.0], &[4, 4]).is_err());
    }
}
