//! Vector-friendly helpers for the cpu kernels, and run-time SIMD dispatch.
//!
//! The crate is built for baseline x86-64 (SSE2). Hot loops are written once as plain Rust with
//! independent lanes (no reassociation needed, so LLVM vectorises them without fast-math) and
//! compiled three times by [`multiversion!`]: AVX-512, AVX2+FMA and baseline; the widest one the
//! CPU supports runs. Rust never contracts a·b+c into an FMA, and the lane structure is explicit,
//! so all three versions compute bit-identical results.

use std::sync::atomic::{AtomicU8, Ordering};

/// Highest SIMD level the dispatcher may pick (tests lower it to compare the versions).
static MAX_LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);

/// The SIMD level used by the kernels: 2 = AVX-512, 1 = AVX2+FMA, 0 = baseline.
#[inline]
pub fn simd_level() -> u8 {
    let detected = detect();
    detected.min(MAX_LEVEL.load(Ordering::Relaxed))
}

/// Caps the SIMD level (0 baseline, 1 AVX2, 2 AVX-512); results do not change, only speed.
pub fn set_max_simd_level(level: u8) {
    MAX_LEVEL.store(level, Ordering::Relaxed);
}

/// A short name of the SIMD level in use, for `Backend::name`.
pub fn simd_name() -> &'static str {
    match simd_level() {
        2 => "AVX-512",
        1 => "AVX2",
        _ => "baseline SIMD",
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn detect() -> u8 {
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") {
        2
    } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        1
    } else {
        0
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn detect() -> u8 {
    0
}

/// Defines `fn name(args) -> ret` whose body is compiled for AVX-512, AVX2 and baseline x86-64,
/// dispatching at run time. Helpers called from the body must be `#[inline(always)]`.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                match $crate::backend::cpu::simd::simd_level() {
                    // SAFETY: the CPU supports the features these versions were compiled for.
                    2 => return unsafe { v4($($arg),*) },
                    1 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Σ a[i]·b[i] over a.len() with 16 independent lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let b = &b[..a.len()];
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    fold16(&acc) + s
}

/// Σ x with 16 independent lanes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut cx = x.chunks_exact(16);
    for ch in &mut cx {
        for i in 0..16 {
            acc[i] += ch[i];
        }
    }
    let mut s = 0f32;
    for &v in cx.remainder() {
        s += v;
    }
    fold16(&acc) + s
}

/// Σ x accumulated in f64 with 8 independent lanes.
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut cx = x.chunks_exact(8);
    for ch in &mut cx {
        for i in 0..8 {
            acc[i] += ch[i] as f64;
        }
    }
    let mut s = 0f64;
    for &v in cx.remainder() {
        s += v as f64;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// max x (NaN-ignoring like f32::max) with 16 independent lanes; −∞ for an empty slice.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut cx = x.chunks_exact(16);
    for ch in &mut cx {
        for i in 0..16 {
            acc[i] = acc[i].max(ch[i]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in cx.remainder() {
        m = m.max(v);
    }
    for a in acc {
        m = m.max(a);
    }
    m
}

#[inline(always)]
fn fold16(a: &[f32; 16]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = a[i] + a[i + 8];
    }
    ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
}

/// y += a·x
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let x = &x[..y.len()];
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// e^x: Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, and Cephes' degree-7 polynomial for e^r
/// (relative error ≲ 2e-7). Returns 0 below −87, saturates at e^88 above 88, keeps NaN. Branch-free
/// integer scaling by 2ⁿ, so it vectorises (std's `exp` is a scalar libm call).
#[inline(always)]
#[allow(clippy::excessive_precision)] // the constants are written as published
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_5e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer held in the low bits
    let xc = x.clamp(-87.0, 88.0); // NaN stays NaN
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * (r * r) + r + 1.0;
    // 2ⁿ from the integer in t's mantissa: bits(t) = 0x4B40_0000 + n
    let scale = f32::from_bits((t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}
