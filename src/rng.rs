//! Random number generators compatible with llm.c: MT19937 as torch's CPU generator (used for
//! weight init and data shuffling) and the xorshift* generator of llm.c's sampler.

/// MT19937, seeded like torch's `manual_seed` / numpy's legacy `RandomState(seed)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for j in 1..624 {
            state[j] = 1812433253u32.wrapping_mul(state[j - 1] ^ (state[j - 1] >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// Fisher–Yates from the end, like llm.c's `random_permutation` (j = randint32 mod (i+1)).
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = (self.next_u32() as usize) % (i + 1);
            xs.swap(i, j);
        }
    }

    /// The generator's full state (for training-state checkpoints).
    pub fn to_words(&self) -> Vec<u32> {
        let mut w = self.state.to_vec();
        w.push(self.index as u32);
        w
    }

    pub fn from_words(words: &[u32]) -> Option<Self> {
        if words.len() != 625 || words[624] > 624 {
            return None;
        }
        let mut state = [0u32; 624];
        state.copy_from_slice(&words[..624]);
        Some(Mt19937 { state, index: words[624] as usize })
    }

    /// torch's CPU `normal_(mean, std)` for a tensor of `out.len()` elements (n >= 16 path:
    /// Box–Muller over blocks of 16 uniforms; a ragged tail redoes the last 16 with fresh draws).
    pub fn normal_fill(&mut self, out: &mut [f32], mean: f32, std: f32) {
        let n = out.len();
        if n >= 16 {
            for v in out.iter_mut() {
                *v = self.uniform24();
            }
            let mut i = 0;
            while i + 16 <= n {
                box_muller16(&mut out[i..i + 16], mean, std);
                i += 16;
            }
            if n % 16 != 0 {
                let tail = &mut out[n - 16..];
                for v in tail.iter_mut() {
                    *v = self.uniform24();
                }
                box_muller16(tail, mean, std);
            }
        } else {
            // torch's scalar path: Box–Muller on 53-bit doubles, outputs in pairs.
            let mut cached: Option<f64> = None;
            for v in out.iter_mut() {
                let z = if let Some(z) = cached.take() {
                    z
                } else {
                    let u1 = self.uniform53();
                    let u2 = self.uniform53();
                    let r = (-2.0 * (1.0 - u2).ln()).sqrt();
                    let theta = 2.0 * std::f64::consts::PI * u1;
                    cached = Some(r * theta.sin());
                    r * theta.cos()
                };
                *v = (z * std as f64 + mean as f64) as f32;
            }
        }
    }

    fn uniform24(&mut self) -> f32 {
        (self.next_u32() & 0xFF_FFFF) as f32 * (1.0 / 16777216.0)
    }

    fn uniform53(&mut self) -> f64 {
        let a = self.next_u32() as u64;
        let b = self.next_u32() as u64;
        (((a << 32) | b) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9007199254740992.0)
    }
}

/// In place: the 16 uniforms become 16 normals (pairs k, k+8).
fn box_muller16(u: &mut [f32], mean: f32, std: f32) {
    for k in 0..8 {
        let u1 = 1.0 - u[k];
        let u2 = u[k + 8];
        let r = (-2.0f32 * (u1 + 1e-12f32).ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
        u[k] = r * theta.cos() * std + mean;
        u[k + 8] = r * theta.sin() * std + mean;
    }
}

/// llm.c's sampler generator (xorshift*): random_u32 and random_f32 in [0, 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u32(&mut self) -> u32 {
        let mut s = self.0;
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        self.0 = s;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / 16777216.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn mt19937_matches_torch_seed_137() {
        // values quoted in llm.c's rand.h comments / the reference notes (seed 137)
        let mut r = Mt19937::new(137);
        let got: Vec<u32> = (0..5).map(|_| r.next_u32()).collect();
        assert_eq!(got, vec![4053805790, 2173880614, 380293709, 1237255315, 2986595568]);
    }
}
