//! What one launch costs, from its kernel's sizes alone: floating-point operations and the bytes
//! it must move to and from device memory. The profiler divides them by measured times
//! (GFLOP/s, GB/s) and the roofline compares them with a device's peaks.
//!
//! FLOPs count the arithmetic of the kernel's formula (`kernels.rs`): a multiply-add is 2, and
//! exp, tanh, sqrt and division count 1 each. Bytes are compulsory traffic: every element each
//! argument names is read once (and written once; twice for read-modify-write), at its buffer's
//! dtype size — re-reads that tiling or a cache would serve are not counted, so achieved GB/s can
//! exceed what the memory moved. The few kernels whose arguments name more than they touch (or
//! less: a gather) are counted by hand below.

use super::signature::Access;
use super::{BufferTable, Kernel};

/// FLOPs and bytes of one launch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        self.flops += o.flops;
        self.bytes += o.bytes;
    }
}

/// Score–value pairs of causal attention over t positions: t(t+1)/2 per (batch, head).
fn causal_pairs(t: usize) -> f64 {
    (t * (t + 1) / 2) as f64
}

impl Kernel {
    /// The launch's FLOPs and compulsory bytes (see the module comment).
    pub fn cost(&self, table: &BufferTable) -> Cost {
        use Kernel::*;
        let size = |v: &super::View| table.try_get(v.buf).map_or(4, |d| d.dtype.size()) as f64;
        // every argument's elements once, read-modify-write twice
        let generic = || -> f64 {
            self.args()
                .iter()
                .map(|a| {
                    let n = if a.need > 0 { a.need } else { a.view.len } as f64;
                    n * size(&a.view) * if a.access == Access::ReadWrite { 2.0 } else { 1.0 }
                })
                .sum()
        };
        let f = |x: usize| x as f64;
        match *self {
            // a row of wte per position (the argument names one row), a row of wpe per position
            EncoderForward { out, wte, wpe, b, t, c, .. } => {
                let n = f(b * t * c);
                Cost { flops: n, bytes: n * (size(&out) + size(&wte)) + f(t * c) * size(&wpe) + f(b * t) * 4.0 }
            }
            EncoderBackward { dwte, dwpe, b, t, c, .. } => {
                let n = f(b * t * c);
                Cost { flops: 2.0 * n, bytes: n * 4.0 + 2.0 * n * size(&dwte) + 2.0 * f(t * c) * size(&dwpe) + f(b * t) * 4.0 }
            }
            EncoderAt { out, wte, wpe, n, c, .. } => {
                Cost { flops: f(n * c), bytes: f(n * c) * (size(&out) + size(&wte) + size(&wpe)) + f(n) * 8.0 }
            }
            LayerNormForward { n, c, .. } => Cost { flops: 7.0 * f(n * c), bytes: generic() },
            LayerNormBackward { n, c, .. } => Cost { flops: 14.0 * f(n * c), bytes: generic() },
            MatmulForward { n, c, oc, bias, .. } => {
                Cost { flops: 2.0 * f(n * c * oc) + if bias.is_some() { f(n * oc) } else { 0.0 }, bytes: generic() }
            }
            // dinp = dout·W and dW += doutᵀ·inp: two products of the forward's size
            MatmulBackward { n, c, oc, dbias, .. } => {
                Cost { flops: 4.0 * f(n * c * oc) + if dbias.is_some() { f(n * oc) } else { 0.0 }, bytes: generic() }
            }
            // QKᵀ and PV over the causal triangle (2·hs each per pair), softmax 4 per pair
            AttentionForward { b, t, c, nh, .. } => {
                let pairs = f(b * nh) * causal_pairs(t);
                let hs = f(c / nh.max(1));
                Cost { flops: pairs * (4.0 * hs + 4.0), bytes: generic() }
            }
            // S recomputed, dP = dout·Vᵀ, dV, dQ, dK: five products (2·hs each), dS 4 per pair
            AttentionBackward { b, t, c, nh, .. } => {
                let pairs = f(b * nh) * causal_pairs(t);
                let hs = f(c / nh.max(1));
                Cost { flops: pairs * (10.0 * hs + 4.0), bytes: generic() }
            }
            // row r writes its key and value rows: 2c read from qkv, 2c written
            KvStore { kcache, n, c, .. } => Cost { flops: 0.0, bytes: f(n * 2 * c) * 4.0 + f(n * 2 * c) * size(&kcache) + f(n) * 8.0 },
            // an upper bound: every row reads its whole window of keys and values
            AttentionCached { kcache, n, c, tmax, .. } => {
                let pairs = f(n * tmax);
                Cost { flops: pairs * 4.0 * f(c) + pairs * 4.0, bytes: f(n * c) * 8.0 + pairs * f(2 * c) * size(&kcache) + f(n) * 8.0 }
            }
            GeluForward { n, .. } => Cost { flops: 9.0 * f(n), bytes: generic() },
            GeluBackward { n, .. } => Cost { flops: 16.0 * f(n), bytes: generic() },
            ResidualForward { n, .. } => Cost { flops: f(n), bytes: generic() },
            // max, Σexp(x−max) and the log per row; the gradient softmax−onehot, scaled
            CrossEntropy { n, v, write_grad, .. } => Cost { flops: f(n * v) * if write_grad { 7.0 } else { 4.0 }, bytes: generic() },
            Zero { out } => Cost { flops: 0.0, bytes: f(out.len) * size(&out) },
            SumSquares { inp, .. } => Cost { flops: 2.0 * f(inp.len), bytes: f(inp.len) * size(&inp) + 4.0 },
            ClipScale { parts, .. } => Cost { flops: f(parts.len) + 2.0, bytes: f(parts.len) * 4.0 },
            AdamW { param, .. } => Cost { flops: 16.0 * f(param.len), bytes: generic() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{BufferTable, DType, Role, View};

    fn table(lens: &[usize]) -> (BufferTable, Vec<View>) {
        let mut t = BufferTable::default();
        let views = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let id = t.add(format!("b{i}"), n, DType::F32, Role::Activation);
                View { buf: id, offset: 0, len: n }
            })
            .collect();
        (t, views)
    }

    // Hand computations at (B, T, C, NH, OC) = (2, 8, 16, 4, 48): n = 16 rows.

    #[test]
    fn matmul_by_hand() {
        let (n, c, oc) = (16, 16, 48);
        let (t, v) = table(&[n * oc, n * c, oc * c, oc]);
        let k = Kernel::MatmulForward { out: v[0], inp: v[1], weight: v[2], bias: Some(v[3]), n, c, oc };
        let got = k.cost(&t);
        // 2·16·16·48 + 16·48 bias adds; out 768 + inp 256 + weight 768 + bias 48 floats
        assert_eq!(got, Cost { flops: 25344.0, bytes: 4.0 * 1840.0 });
        let (t, v) = table(&[n * c, oc * c, oc, n * oc, n * c, oc * c]);
        let k = Kernel::MatmulBackward { dinp: v[0], dweight: v[1], dbias: Some(v[2]), dout: v[3], inp: v[4], weight: v[5], n, c, oc };
        // two products 4·16·16·48 + 768 bias sums; dinp 256 + dW 2·768 + db 2·48 + dout 768 + inp 256 + W 768
        assert_eq!(k.cost(&t), Cost { flops: 49920.0, bytes: 4.0 * 3680.0 });
    }

    #[test]
    fn attention_by_hand() {
        let (b, tt, c, nh) = (2, 8, 16, 4);
        let (t, v) = table(&[b * tt * c, b * nh * tt, b * tt * 3 * c]);
        let k = Kernel::AttentionForward { out: v[0], lse: v[1], qkv: v[2], b, t: tt, c, nh };
        // 8 (b, h) pairs × 36 causal pairs × (4·hs + 4) with hs = 4; out 256 + lse 64 + qkv 768 floats
        assert_eq!(k.cost(&t), Cost { flops: 8.0 * 36.0 * 20.0, bytes: 4.0 * 1088.0 });
    }

    #[test]
    fn layernorm_by_hand() {
        let (n, c) = (16, 16);
        let (t, v) = table(&[n * c, n, n, n * c, c, c]);
        let k = Kernel::LayerNormForward { out: v[0], mean: v[1], rstd: v[2], inp: v[3], weight: v[4], bias: v[5], n, c };
        // 7 per element; out 256 + mean 16 + rstd 16 + inp 256 + weight 16 + bias 16 floats
        assert_eq!(k.cost(&t), Cost { flops: 7.0 * 256.0, bytes: 4.0 * 576.0 });
    }
}
