//! Observers the forward pass calls at named points, outside the maths: routing tracing and
//! phase profiling.

use super::profile::Profiler;
use crate::moe::router::Route;

/// The routing decisions of one MoE layer for one batch, recorded when tracing is on
/// (calibration statistics and router distillation read these).
#[derive(Clone, Debug)]
pub struct LayerRouting {
    pub layer: usize,
    /// Position of the batch's first token.
    pub first_pos: usize,
    /// Raw router logits, `[n, n_expert]`.
    pub logits: Vec<f32>,
    /// The experts each token used and their weights.
    pub routes: Vec<Route>,
}

#[derive(Default)]
pub struct Observers {
    pub trace: RouteTrace,
    pub prof: Profiler,
}

/// Routing decisions recorded since tracing was switched on.
#[derive(Default)]
pub struct RouteTrace(pub Option<Vec<LayerRouting>>);

impl RouteTrace {
    /// Whether routing is being recorded.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// After a MoE layer routed the batch starting at `first_pos`.
    pub fn on_routing(&mut self, layer: usize, first_pos: usize, logits: &[f32], routes: &[Route]) {
        if let Some(trace) = &mut self.0 {
            trace.push(LayerRouting {
                layer,
                first_pos,
                logits: logits.to_vec(),
                routes: routes.to_vec(),
            });
        }
    }
}
