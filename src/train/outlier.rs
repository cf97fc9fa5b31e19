//! Outlier detection for skipping updates (llm.c's `-sl`/`-sg`): a window of the last 128 values;
//! once it is full, each new value's z-score against the window (which includes it) is
//! z = (x − mean) / std with the population standard deviation. Before that, NaN (never skip).

pub const WINDOW: usize = 128;

#[derive(Clone, Debug)]
pub struct OutlierDetector {
    buf: Vec<f64>,
    /// the slot the next value replaces once the window is full
    next: usize,
}

impl Default for OutlierDetector {
    fn default() -> Self {
        OutlierDetector { buf: Vec::with_capacity(WINDOW), next: 0 }
    }
}

impl OutlierDetector {
    /// Add `x` and return its z-score (NaN while the window is filling; 0 when the window is constant).
    pub fn update(&mut self, x: f64) -> f64 {
        if self.buf.len() < WINDOW {
            self.buf.push(x);
            return f64::NAN;
        }
        self.buf[self.next] = x;
        self.next = (self.next + 1) % WINDOW;
        // recomputed in full: 128 values per step is nothing, and no running sum drifts
        let n = WINDOW as f64;
        let mean = self.buf.iter().sum::<f64>() / n;
        let var = self.buf.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        if var <= 0.0 {
            return 0.0;
        }
        (x - mean) / var.sqrt()
    }

    /// The window's values (in slot order) and the slot the next value replaces, for checkpoints.
    pub fn to_parts(&self) -> (&[f64], usize) {
        (&self.buf, self.next)
    }

    /// A detector continuing from [`to_parts`](Self::to_parts); None if the parts cannot come from
    /// one (more than 128 values, or a slot outside the window).
    pub fn from_parts(values: &[f64], next: usize) -> Option<Self> {
        let ok = if values.len() < WINDOW { next == 0 } else { values.len() == WINDOW && next < WINDOW };
        ok.then(|| {
            let mut buf = Vec::with_capacity(WINDOW);
            buf.extend_from_slice(values);
            OutlierDetector { buf, next }
        })
    }
}

/// Whether a z-score exceeds a threshold (0 = this check is off; NaN never does).
pub fn exceeds(z: f64, threshold: f32) -> bool {
    threshold != 0.0 && z.is_finite() && z > threshold as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_until_full_then_the_z_score_of_the_window() {
        let mut d = OutlierDetector::default();
        for i in 0..WINDOW {
            assert!(d.update(i as f64).is_nan());
        }
        // window now 1..=127 and 1000
        let z = d.update(1000.0);
        let w: Vec<f64> = (1..WINDOW).map(|i| i as f64).chain([1000.0]).collect();
        let mean = w.iter().sum::<f64>() / 128.0;
        let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 128.0).sqrt();
        assert!((z - (1000.0 - mean) / std).abs() < 1e-12, "{z}");
        assert!(z > 10.0);
        // a value at the window's mean scores about 0
        let mut c = OutlierDetector::default();
        for _ in 0..WINDOW {
            c.update(5.0);
        }
        assert_eq!(c.update(5.0), 0.0);
        assert!(exceeds(3.1, 3.0) && !exceeds(2.9, 3.0) && !exceeds(f64::NAN, 3.0) && !exceeds(100.0, 0.0));
    }
}
