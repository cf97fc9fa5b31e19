//! Learning-rate schedules, as llm.c's schedulers.h defines them (step is 0-based, `total` = number
//! of optimiser steps).

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum ScheduleKind {
    /// warmup, then cosine decay to lr·final_lr_frac
    Cosine,
    /// warmup, then linear decay to lr·final_lr_frac
    Linear,
    /// lr throughout (no warmup)
    Constant,
    /// warmup, constant until 80% of the steps, then 1−√r decay ("warmup-stable-decay")
    Wsd,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f32,
    pub warmup: usize,
    pub total: usize,
    pub final_frac: f32,
}

impl Schedule {
    pub fn new(kind: ScheduleKind, lr: f32, warmup: usize, total: usize, final_frac: f32) -> Result<Schedule> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::flag("--lr", format!("must be a finite number >= 0, got {lr}")));
        }
        if !(0.0..=1.0).contains(&final_frac) {
            return Err(Error::flag("--final-lr-frac", format!("must be in [0, 1], got {final_frac}")));
        }
        Ok(Schedule { kind, lr, warmup, total, final_frac })
    }

    /// Learning rate of optimiser step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f32 {
        let lr = self.lr;
        let lr_min = lr * self.final_frac;
        if self.kind == ScheduleKind::Constant {
            return lr;
        }
        if step < self.warmup {
            return lr * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let r = ((step - self.warmup) as f32 / span as f32).min(1.0);
        match self.kind {
            ScheduleKind::Cosine => lr_min + 0.5 * (1.0 + (std::f32::consts::PI * r).cos()) * (lr - lr_min),
            ScheduleKind::Linear => lr - r * (lr - lr_min),
            ScheduleKind::Wsd => {
                let decay_start = (0.8 * self.total as f32) as usize;
                if step < decay_start {
                    lr
                } else {
                    let r = (step - decay_start) as f32 / (self.total - decay_start).max(1) as f32;
                    lr_min + (1.0 - r.min(1.0).sqrt()) * (lr - lr_min)
                }
            }
            ScheduleKind::Constant => lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn cosine_warmup_then_decay() {
        let s = Schedule::new(ScheduleKind::Cosine, 1.0, 10, 110, 0.1).unwrap();
        assert!((s.lr_at(0) - 0.1).abs() < 1e-6);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-6);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-6);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-5); // halfway: min + 0.5·(max−min)
        assert!((s.lr_at(110) - 0.1).abs() < 1e-6);
    }
    #[test]
    fn linear_wsd_constant() {
        let l = Schedule::new(ScheduleKind::Linear, 2.0, 0, 100, 0.0).unwrap();
        assert!((l.lr_at(50) - 1.0).abs() < 1e-6);
        let c = Schedule::new(ScheduleKind::Constant, 3.0, 5, 100, 0.0).unwrap();
        assert_eq!(c.lr_at(0), 3.0);
        let w = Schedule::new(ScheduleKind::Wsd, 1.0, 0, 100, 0.0).unwrap();
        assert_eq!(w.lr_at(79), 1.0);
        assert!((w.lr_at(85) - (1.0 - (0.25f32).sqrt())).abs() < 1e-6);
    }
}
