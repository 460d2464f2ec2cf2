//! Expert selection from router logits.

/// At most this many experts per token (fixed capacity keeps routing allocation-free).
pub const MAX_EXPERTS_USED: usize = 16;

/// The experts one token uses and their weights, best first.
#[derive(Clone, Debug, Default)]
pub struct Route {
    pub experts: heapless::Vec<u32, MAX_EXPERTS_USED>,
    pub weights: heapless::Vec<f32, MAX_EXPERTS_USED>,
}

impl Route {
    pub fn weight_of(&self, expert: usize) -> Option<f32> {
        self.experts
            .iter()
            .position(|&e| e as usize == expert)
            .map(|i| self.weights[i])
    }
}

/// Softmax over all experts, top-k by probability, optionally renormalised to sum to one
/// (transformers' Mixtral/Qwen/OLMoE routing; Granite's softmax over the top-k logits is the
/// renormalised case).
pub fn route(logits: &[f32], k: usize, renormalize: bool) -> Route {
    assert!(k <= MAX_EXPERTS_USED && k <= logits.len());
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
    let mut r = Route::default();
    // Selection by repeated scan: k and the expert count are small, and ties resolve to the
    // lower index like torch.topk on CPU.
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for (e, &v) in logits.iter().enumerate() {
            if r.experts.contains(&(e as u32)) {
                continue;
            }
            if best.is_none_or(|b| v > logits[b]) {
                best = Some(e);
            }
        }
        let e = best.expect("k <= number of experts");
        let _ = r.experts.push(e as u32);
        let _ = r.weights.push((logits[e] - max).exp() / sum);
    }
    if renormalize {
        let total: f32 = r.weights.iter().sum();
        r.weights.iter_mut().for_each(|w| *w /= total);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_top_k_and_renormalises() {
        let r = route(&[0.0, 2.0, 1.0, -1.0], 2, true);
        assert_eq!(&r.experts[..], &[1, 2]);
        let (a, b) = (2f32.exp(), 1f32.exp());
        assert!((r.weights[0] - a / (a + b)).abs() < 1e-6);
        assert!((r.weights[0] + r.weights[1] - 1.0).abs() < 1e-6);
        let r = route(&[0.0, 2.0, 1.0, -1.0], 1, false);
        let z: f32 = [0f32, 2.0, 1.0, -1.0].iter().map(|v| v.exp()).sum();
        assert!((r.weights[0] - 2f32.exp() / z).abs() < 1e-6);
    }
}
