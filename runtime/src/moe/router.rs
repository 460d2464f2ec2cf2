//! Expert selection from router logits.

/// At most this many expert groups (group-limited routing keeps them in fixed capacity).
pub const MAX_EXPERT_GROUPS: usize = 64;

/// At most this many experts per token (fixed capacity keeps routing allocation-free).
pub const MAX_EXPERTS_USED: usize = 16;

/// At most this many experts per layer: routing scores live on the stack, so routing allocates
/// on no thread (a per-thread buffer would allocate the first time a new pool worker routes).
pub const MAX_EXPERTS: usize = 1024;

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

/// Where a MoE layer's router logits come from.
#[derive(Clone, Copy, Debug)]
pub enum RoutingSource<'a> {
    /// The layer's own gate (`ffn_gate_inp`) applied to the layer's input.
    Layer,
    /// Scores decided before the backbone ran, shared by every layer (Read-ME's decoupled
    /// router, `moe::decoupled`): `[n, n_expert]` for the batch. The layer's gating (softmax,
    /// top-k, masks) is applied to them as to its own logits.
    Decided(&'a [f32]),
}

/// How router scores are computed from logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gating {
    /// Softmax over all experts (Mixtral, Qwen, OLMoE, DeepSeek-V2).
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
    /// Top-k of the logits themselves, then a softmax over the k selected (gpt-oss; llama.cpp's
    /// `LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT`).
    SoftmaxWeight,
}

/// How a group of experts is scored when selection is limited to the best groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScore {
    /// The group's best expert (DeepSeek-V2's `group_limited_greedy`).
    Max,
    /// The sum of the group's two best experts (DeepSeek-V3, and what llama.cpp computes).
    TopTwoSum,
}

/// Experts are split into `n_group` consecutive groups; only the `topk_group` best groups compete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimit {
    pub n_group: usize,
    pub topk_group: usize,
    pub score: GroupScore,
}

/// Everything that decides a route, read from the model's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoutingSpec {
    /// Experts per token.
    pub k: usize,
    pub gating: Gating,
    /// Renormalise the k selected weights to sum to one.
    pub norm_topk: bool,
    /// Multiplies the final weights (DeepSeek's routed_scaling_factor; 1 elsewhere).
    pub scale: f32,
    pub groups: Option<GroupLimit>,
}

impl RoutingSpec {
    /// Softmax, top-k, optional renormalisation: the routing of every non-DeepSeek model here.
    pub fn plain(k: usize, norm_topk: bool) -> Self {
        Self {
            k,
            gating: Gating::Softmax,
            norm_topk,
            scale: 1.0,
            groups: None,
        }
    }
}

/// Routes one token. `bias` (DeepSeek-V3's e_score_correction_bias) is added to the scores for
/// choosing experts only; the weights are the unbiased scores.
pub fn route_with(spec: &RoutingSpec, logits: &[f32], bias: Option<&[f32]>) -> Route {
    if spec.gating == Gating::Softmax && spec.groups.is_none() && bias.is_none() {
        let mut r = route(logits, spec.k, spec.norm_topk);
        if spec.scale != 1.0 {
            r.weights.iter_mut().for_each(|w| *w *= spec.scale);
        }
        return r;
    }
    let n = logits.len();
    assert!(spec.k <= MAX_EXPERTS_USED && spec.k <= n);
    assert!(
        n <= MAX_EXPERTS,
        "{n} experts: at most {MAX_EXPERTS} are supported"
    );
    let scores = scores_of(spec, logits);
    let mut choice: heapless::Vec<f32, MAX_EXPERTS> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    route_scores(spec, logits, &scores, &mut choice)
}

/// Group limits, top-k and weights from the scores and the (biased) selection values.
fn route_scores(spec: &RoutingSpec, logits: &[f32], scores: &[f32], choice: &mut [f32]) -> Route {
    let n = logits.len();
    // A masked (pruned) expert has logit -inf: never chosen, whatever its bias.
    for (c, &v) in choice.iter_mut().zip(logits) {
        if v == f32::NEG_INFINITY {
            *c = f32::NEG_INFINITY;
        }
    }
    if let Some(g) = spec.groups.filter(|g| g.n_group > 1) {
        let per = n / g.n_group;
        let group_scores: heapless::Vec<f32, MAX_EXPERT_GROUPS> = choice
            .chunks_exact(per)
            .map(|grp| match g.score {
                GroupScore::Max => grp.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
                GroupScore::TopTwoSum => {
                    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &v in grp {
                        if v > a {
                            b = a;
                            a = v;
                        } else if v > b {
                            b = v;
                        }
                    }
                    a + b
                }
            })
            .collect();
        let keep = top_indices(&group_scores, g.topk_group);
        for (gi, grp) in choice.chunks_exact_mut(per).enumerate() {
            if !keep.contains(&gi) {
                grp.fill(f32::NEG_INFINITY);
            }
        }
    }
    let chosen = top_indices(choice, spec.k);
    weigh(spec, scores, chosen.iter().map(|&e| e as u32))
}

/// The gating function's score of every expert (the selection may add a bias to them).
fn scores_of(spec: &RoutingSpec, logits: &[f32]) -> heapless::Vec<f32, MAX_EXPERTS> {
    let mut scores: heapless::Vec<f32, MAX_EXPERTS> = heapless::Vec::new();
    match spec.gating {
        Gating::Softmax => {
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
            scores.extend(logits.iter().map(|&v| (v - max).exp() / sum));
        }
        Gating::Sigmoid => scores.extend(logits.iter().map(|&v| 1.0 / (1.0 + (-v).exp()))),
        Gating::SoftmaxWeight => scores.extend(logits.iter().copied()),
    }
    scores
}

/// A route to experts chosen elsewhere (a replayed routing trace), weighted as the model's own
/// routing would weigh them: the gating scores of these experts, renormalised and scaled as
/// `spec` says. For the experts the router itself chose, in its order, this is its route.
pub fn route_forced(spec: &RoutingSpec, logits: &[f32], experts: &[u32]) -> Route {
    let n = logits.len();
    assert!(experts.len() <= MAX_EXPERTS_USED && experts.iter().all(|&e| (e as usize) < n));
    assert!(
        n <= MAX_EXPERTS,
        "{n} experts: at most {MAX_EXPERTS} are supported"
    );
    weigh(spec, scores_of(spec, logits), experts.iter().copied())
}

/// The route to `chosen` (best first) with the gating scores as weights, then the gating's
/// own normalisation and scale.
fn weigh(
    spec: &RoutingSpec,
    scores: impl AsRef<[f32]>,
    chosen: impl Iterator<Item = u32>,
) -> Route {
    let scores = scores.as_ref();
    let mut r = Route::default();
    for e in chosen {
        let _ = r.experts.push(e);
        let _ = r.weights.push(scores[e as usize]);
    }
    if spec.gating == Gating::SoftmaxWeight {
        // transformers' GptOssTopKRouter: softmax over the selected logits.
        let max = r.weights.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        r.weights.iter_mut().for_each(|w| *w = (*w - max).exp());
        let sum: f32 = r.weights.iter().sum();
        r.weights.iter_mut().for_each(|w| *w /= sum);
    }
    if spec.norm_topk {
        // transformers' DeepSeek-V3 adds 1e-20 to the denominator.
        let total: f32 = r.weights.iter().sum::<f32>() + 1e-20;
        r.weights.iter_mut().for_each(|w| *w /= total);
    }
    r.weights.iter_mut().for_each(|w| *w *= spec.scale);
    r
}

/// Indices of the `k` largest values, best first; ties go to the lower index.
fn top_indices(v: &[f32], k: usize) -> heapless::Vec<usize, 64> {
    let mut out = heapless::Vec::new();
    for _ in 0..k.min(64) {
        let mut best: Option<usize> = None;
        for (i, &x) in v.iter().enumerate() {
            if out.contains(&i) {
                continue;
            }
            if best.is_none_or(|b| x > v[b]) {
                best = Some(i);
            }
        }
        match best {
            Some(b) => {
                let _ = out.push(b);
            }
            None => break,
        }
    }
    out
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

    #[test]
    fn sigmoid_bias_selects_but_does_not_weigh() {
        // Expert 0 has the best score but a large negative bias; expert 2 a positive one.
        let logits = [2.0, 1.0, 0.0, -1.0];
        let bias = [-5.0, 0.0, 2.0, 0.0];
        let spec = RoutingSpec {
            k: 2,
            gating: Gating::Sigmoid,
            norm_topk: false,
            scale: 2.0,
            groups: None,
        };
        let r = route_with(&spec, &logits, Some(&bias));
        assert_eq!(&r.experts[..], &[2, 1]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((r.weights[0] - 2.0 * sig(0.0)).abs() < 1e-6);
        assert!((r.weights[1] - 2.0 * sig(1.0)).abs() < 1e-6);
    }

    #[test]
    fn group_limits_follow_the_group_score() {
        // Groups of two: {0,1} {2,3} {4,5}. Best single expert is 4, but group {2,3} has the
        // best top-two sum; with Max scoring group {4,5} wins instead.
        let logits = [0.0, 0.1, 2.0, 2.0, 3.0, -3.0];
        let mut spec = RoutingSpec {
            k: 2,
            gating: Gating::Sigmoid,
            norm_topk: true,
            scale: 1.0,
            groups: Some(GroupLimit {
                n_group: 3,
                topk_group: 1,
                score: GroupScore::TopTwoSum,
            }),
        };
        let r = route_with(&spec, &logits, None);
        assert_eq!(&r.experts[..], &[2, 3]);
        assert!((r.weights[0] - 0.5).abs() < 1e-6);
        spec.groups.as_mut().unwrap().score = GroupScore::Max;
        let r = route_with(&spec, &logits, None);
        assert_eq!(&r.experts[..], &[4, 5]);
    }

    #[test]
    fn softmax_weight_selects_by_logit_and_weighs_the_selected() {
        let logits = [0.5, 3.0, -1.0, 2.0];
        let spec = RoutingSpec {
            gating: Gating::SoftmaxWeight,
            ..RoutingSpec::plain(2, false)
        };
        let r = route_with(&spec, &logits, None);
        assert_eq!(&r.experts[..], &[1, 3]);
        let (a, b) = (3f32.exp(), 2f32.exp());
        assert!((r.weights[0] - a / (a + b)).abs() < 1e-6);
        assert!((r.weights[1] - b / (a + b)).abs() < 1e-6);
        // The same choice and weights as a softmax over all experts renormalised over the top-k.
        let plain = route(&logits, 2, true);
        assert_eq!(plain.experts, r.experts);
        assert!((plain.weights[0] - r.weights[0]).abs() < 1e-6);
    }

    #[test]
    fn plain_spec_is_the_classic_route() {
        let l = [0.3, -1.0, 2.0, 0.7, 0.1];
        let a = route(&l, 2, true);
        let b = route_with(&RoutingSpec::plain(2, true), &l, None);
        assert_eq!(a.experts, b.experts);
        assert_eq!(a.weights, b.weights);
    }
}
