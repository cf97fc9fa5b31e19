//! Dynamic loss scaling for fp16 training, as PyTorch's `GradScaler` does it: the loss gradient
//! is seeded S times larger (so small gradients do not flush to zero in f16), `ClipScale`
//! divides S out of the norm and the update on the device, and a step whose gradients overflowed
//! (inf/NaN norm, found on the device and read back with the norm) is skipped by AdamW there.
//! The host then halves S; after `window` clean steps in a row it doubles S.

/// The scaler's state; saved in the checkpoint's state file, so `--resume` continues with the
/// same scale, count of clean steps and of skipped steps.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    /// the loss scale S
    pub scale: f32,
    /// clean steps after which S doubles
    pub window: usize,
    /// clean steps since the last change of S
    pub clean: usize,
    /// steps skipped so far because their gradients overflowed
    pub skipped: usize,
}

/// What a step did to the scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleChange {
    /// the step ran; S unchanged
    Kept,
    /// the step ran and completed a window of clean steps: S doubled
    Grew,
    /// the gradients overflowed: the step was skipped and S halved
    Backoff,
}

impl LossScaler {
    /// PyTorch's defaults are a first scale of 65536 and a window of 2000.
    pub fn new(scale: f32, window: usize) -> LossScaler {
        LossScaler { scale, window: window.max(1), clean: 0, skipped: 0 }
    }

    /// After a step whose gradients did (`found_inf`) or did not overflow.
    pub fn update(&mut self, found_inf: bool) -> ScaleChange {
        if found_inf {
            self.scale *= 0.5;
            self.clean = 0;
            self.skipped += 1;
            return ScaleChange::Backoff;
        }
        self.clean += 1;
        if self.clean >= self.window {
            self.clean = 0;
            // f32::MAX would overflow every gradient at once; stay a finite power of two
            if (self.scale * 2.0).is_finite() {
                self.scale *= 2.0;
                return ScaleChange::Grew;
            }
        }
        ScaleChange::Kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_a_clean_window() {
        let mut s = LossScaler::new(65536.0, 3);
        assert_eq!(s.update(true), ScaleChange::Backoff);
        assert_eq!((s.scale, s.clean, s.skipped), (32768.0, 0, 1));
        assert_eq!(s.update(false), ScaleChange::Kept);
        assert_eq!(s.update(false), ScaleChange::Kept);
        // an overflow restarts the window
        assert_eq!(s.update(true), ScaleChange::Backoff);
        assert_eq!((s.scale, s.clean, s.skipped), (16384.0, 0, 2));
        for _ in 0..2 {
            assert_eq!(s.update(false), ScaleChange::Kept);
        }
        assert_eq!(s.update(false), ScaleChange::Grew);
        assert_eq!((s.scale, s.clean), (32768.0, 0));
        // never to infinity
        let mut big = LossScaler::new(f32::MAX, 1);
        assert_eq!(big.update(false), ScaleChange::Kept);
        assert_eq!(big.scale, f32::MAX);
    }
}
