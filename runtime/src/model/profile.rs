//! Where a forward pass spends its time, by phase: switched on by `moe-run bench --profile`
//! (off, it costs one branch per phase).

use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Embedding lookup, norms, residual adds, lookahead prediction.
    Other,
    /// The q/k/v and output projections of attention (and a short convolution's in/out
    /// projections).
    AttnProjections,
    /// Rope, KV-cache writes, scores, softmax and the weighted sum of values.
    AttnCore,
    /// A short convolution's gating and taps (LFM2), between its projections.
    ConvCore,
    /// A Gated DeltaNet's convolution, delta rule and gated norm (Qwen3.5), between its
    /// projections.
    DeltaNetCore,
    /// A Mamba-2 layer's convolution, selective scan and gated norm (Granite-4.0-H), between
    /// its projections.
    SsmCore,
    /// Router matrix, expert selection and the per-expert token lists.
    Routing,
    /// Expert (and shared-expert or dense) MLP products.
    Experts,
    /// Waiting for the expert cache to deliver experts read from flash.
    ExpertIo,
    /// Final norm and output projection.
    Output,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::AttnProjections,
        Phase::AttnCore,
        Phase::ConvCore,
        Phase::DeltaNetCore,
        Phase::SsmCore,
        Phase::Routing,
        Phase::Experts,
        Phase::ExpertIo,
        Phase::Output,
        Phase::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Other => "other",
            Phase::AttnProjections => "attention projections",
            Phase::AttnCore => "attention core",
            Phase::ConvCore => "short convolution",
            Phase::DeltaNetCore => "gated delta rule",
            Phase::SsmCore => "selective scan",
            Phase::Routing => "routing",
            Phase::Experts => "expert matmuls",
            Phase::ExpertIo => "expert I/O wait",
            Phase::Output => "output projection",
        }
    }
}

/// Seconds per phase since the last reset, measured lap by lap.
#[derive(Default)]
pub struct Profiler {
    last: Option<Instant>,
    seconds: Option<[f64; Phase::ALL.len()]>,
}

impl Profiler {
    pub fn enable(&mut self, on: bool) {
        self.seconds = on.then_some([0.0; Phase::ALL.len()]);
        self.last = None;
    }

    /// Starts timing (the time since the previous lap is not charged to anything).
    pub fn start(&mut self) {
        if self.seconds.is_some() {
            self.last = Some(Instant::now());
        }
    }

    /// Charges the time since the previous lap to `phase`.
    pub fn lap(&mut self, phase: Phase) {
        if let (Some(secs), Some(last)) = (&mut self.seconds, self.last) {
            let now = Instant::now();
            secs[phase as usize] += (now - last).as_secs_f64();
            self.last = Some(now);
        }
    }

    /// (phase, seconds) for every phase, when profiling is on.
    pub fn report(&self) -> Option<Vec<(Phase, f64)>> {
        self.seconds
            .map(|s| Phase::ALL.iter().map(|&p| (p, s[p as usize])).collect())
    }

    pub fn reset(&mut self) {
        if let Some(s) = &mut self.seconds {
            *s = [0.0; Phase::ALL.len()];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every phase has a slot (a phase added to the enum once overran a fixed-size array).
    #[test]
    fn every_phase_is_charged() {
        let mut p = Profiler::default();
        p.enable(true);
        p.start();
        for phase in Phase::ALL {
            p.lap(phase);
        }
        let report = p.report().unwrap();
        assert_eq!(report.len(), Phase::ALL.len());
        let names: std::collections::HashSet<_> = report.iter().map(|(p, _)| p.name()).collect();
        assert_eq!(names.len(), Phase::ALL.len());
    }
}
