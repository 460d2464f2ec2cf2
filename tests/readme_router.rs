//! A model routed by a Read-ME decoupled router (one small causal transformer over token ids whose
//! choice every MoE layer uses): the converter carries the router into the GGUF, the runtime runs
//! it natively before the backbone, and the result reproduces the PyTorch reference
//! (scripts/fixtures/make_readme_fixture.py): logits, greedy ids, and each layer's experts. The routes are
//! known before layer 0, so the expert cache loads them ahead; streamed stays bit-identical to
//! resident.

use std::sync::Arc;

use moe_e2e::{
    cache_config, expert_cache, greedy, max_rel_diff, prompt_logits, stepwise_logits, Fixture,
};
use moe_runtime::gguf::GgmlType;
use moe_runtime::model::{ExpertStreaming, KvType, Model, Session};
use moe_runtime::moe::cache::{Eviction, ExpertCache};
use moe_runtime::sampling::argmax_logits;
use serde::Deserialize;

const FIXTURE: &str = "qwen3_moe_readme";
const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    /// Per prompt token, the experts the decoupled router picks (best first).
    router_experts: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Case>,
}

fn router_cases(fx: &Fixture) -> Vec<Case> {
    let text = std::fs::read_to_string(fx.dir.join("expected.json")).unwrap();
    serde_json::from_str::<Expected>(&text).unwrap().prompts
}

#[test]
fn converter_writes_the_router() {
    let fx = Fixture::load(FIXTURE);
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let h = file.header();
    assert_eq!(
        h.get("moe_edge.router.kind").and_then(|v| v.as_str()),
        Some("readme")
    );
    let t = h.tensor("moe_edge.router.blk.0.attn_q.weight").unwrap();
    assert_eq!(
        t.ty,
        GgmlType::F32,
        "the router stays f32 in quantized files"
    );
    assert_eq!(t.dims, vec![32, 32]);
    assert_eq!(
        h.tensor("moe_edge.router.output.weight").unwrap().dims,
        vec![32, 8]
    );
    assert!(Model::load(&file).unwrap().router.is_some());
}

#[test]
fn logits_and_greedy_ids_match_pytorch() {
    let fx = Fixture::load(FIXTURE);
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    for (i, case) in fx.expected.prompts.iter().enumerate() {
        let (want, n, vocab) = fx.logits(i);
        assert_eq!(n, case.ids.len());
        for (how, got) in [
            ("prefill", prompt_logits(&file, &case.ids)),
            ("one token at a time", stepwise_logits(&file, &case.ids)),
        ] {
            let diff = max_rel_diff(&got, &want, vocab);
            println!("prompt {i} {how}: max |diff| / max |logit| = {diff:.2e}");
            assert!(
                diff < TOLERANCE,
                "prompt {i} {how}: logits differ by {diff:e}"
            );
        }
        assert_eq!(
            greedy(&file, &case.ids, case.greedy_ids.len()),
            case.greedy_ids,
            "prompt {i}: greedy continuation"
        );
    }
}

#[test]
fn every_layer_uses_the_decoupled_routers_choice() {
    let fx = Fixture::load(FIXTURE);
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    for case in router_cases(&fx) {
        let mut s = Session::with_kv_type(&model, 256, KvType::F32);
        s.set_route_tracing(true);
        s.forward(&case.ids, false).unwrap();
        let trace = s.take_route_trace();
        assert_eq!(trace.len(), model.hp.n_layer);
        for layer in &trace {
            let got: Vec<Vec<u32>> = layer.routes.iter().map(|r| r.experts.to_vec()).collect();
            assert_eq!(got, case.router_experts, "layer {}", layer.layer);
            // Weights follow the backbone's gating: softmax, top-2, renormalised.
            for r in &layer.routes {
                assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            }
        }
    }
}

/// Logits of every prompt position plus 8 greedy tokens.
fn run(
    model: &Model,
    ids: &[u32],
    cache: Option<Arc<ExpertCache>>,
    lookahead: usize,
) -> (Vec<f32>, Vec<u32>) {
    let mut s = Session::with_kv_type(model, 256, KvType::F32);
    if let Some(c) = cache {
        s.set_streaming(ExpertStreaming {
            cache: Some(c),
            lookahead,
        });
    }
    let mut logits = s.forward(ids, true).unwrap().to_vec();
    let vocab = model.hp.n_vocab;
    let mut next = argmax_logits(&logits[logits.len() - vocab..]);
    let mut out = vec![next];
    for _ in 0..7 {
        let l = s.forward(&[next], false).unwrap().to_vec();
        next = argmax_logits(&l);
        logits.extend_from_slice(&l);
        out.push(next);
    }
    assert!(s.decoupled_router_seconds() > 0.0);
    (logits, out)
}

#[test]
fn streamed_under_a_tight_budget_equals_resident_and_loads_ahead() {
    let fx = Fixture::load(FIXTURE);
    for ty in [GgmlType::F32, GgmlType::Q8_0] {
        let conv = fx.convert(ty);
        let file = conv.open();
        let model = Model::load(&file).unwrap();
        let ids = &fx.expected.prompts[2].ids;
        let resident = run(&model, ids, None, 0);
        let n_used = model.hp.n_expert_used;
        // n_used slots: one token's experts of one layer; 2 layers x 2 experts: the next
        // layer's experts are loaded while the current one runs only as far as slots allow.
        // The lookahead gate is skipped for such models (their per-layer gates are unused).
        for (slots, eviction, lookahead) in [
            (n_used, Eviction::Belady, 0),
            (2 * n_used, Eviction::Belady, 0),
            (2 * n_used, Eviction::Lru, 0),
            (2 * n_used, Eviction::Belady, 1),
        ] {
            let c = expert_cache(&model, &conv.path, cache_config(slots, eviction));
            let streamed = run(&model, ids, Some(c.clone()), lookahead);
            assert!(
                streamed.0 == resident.0 && streamed.1 == resident.1,
                "{ty} slots={slots} {eviction:?}: streamed run differs from resident"
            );
            let st = c.stats();
            println!("{ty} slots={slots} {eviction:?}: {st:?}");
            assert!(st.demand_misses + st.demand_hits > 0);
            // The decoupled router's choices are exact, so loads issued ahead are used.
            assert!(st.prefetches_issued > 0, "nothing was loaded ahead");
            assert!(st.prefetches_used > 0, "no load ahead was used");
        }
    }
}
