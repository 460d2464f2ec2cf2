//! Several sequences run together (`Session::forward_batch`, moed's `--parallel`): each gets
//! bit-identical logits and greedy tokens to a run of its own, on every fixture, resident and
//! with experts streamed through a small cache; the batch's prompts are evaluated together
//! (different lengths), sequences join and leave the batch between steps, and an expert the
//! batch shares is used (read) once per step.

use std::sync::Arc;

use moe_e2e::{cache_config, expert_cache, Fixture, FIXTURES};
use moe_runtime::gguf::GgmlType;
use moe_runtime::model::{ExpertStreaming, KvType, Model, SavedSequence, Session};
use moe_runtime::moe::cache::{Eviction, ExpertCache};
use moe_runtime::sampling::argmax_logits;

const STEPS: usize = 6;
const N_CTX: usize = 96;

/// Per sequence: the logits of its prompt's last id and of each greedy token, and the tokens.
type Run = Vec<(Vec<f32>, Vec<u32>)>;

fn session<'m, 'a>(model: &'m Model<'a>, cache: Option<&Arc<ExpertCache>>) -> Session<'m, 'a> {
    let mut s = Session::with_kv_type(model, N_CTX, KvType::F16);
    if let Some(c) = cache {
        s.set_streaming(ExpertStreaming {
            cache: Some(c.clone()),
            lookahead: 1,
        });
    }
    s
}

/// Each prompt alone in a fresh session, then `steps[i]` greedy tokens. Also returns the
/// routed-expert bytes the decode steps used, all sequences summed.
fn alone(
    model: &Model,
    prompts: &[Vec<u32>],
    steps: &[usize],
    cache: Option<&Arc<ExpertCache>>,
) -> (Run, u64) {
    let mut decode_bytes = 0;
    let run = prompts
        .iter()
        .zip(steps)
        .map(|(p, &steps)| {
            let mut s = session(model, cache);
            let mut logits = s.forward(p, false).unwrap().to_vec();
            let mut tokens = Vec::new();
            for step in 0..steps {
                let next = argmax_logits(&logits[logits.len() - model.hp.n_vocab..]);
                tokens.push(next);
                if step + 1 < steps {
                    let b0 = s.expert_bytes_used();
                    logits.extend_from_slice(s.forward(&[next], false).unwrap());
                    decode_bytes += s.expert_bytes_used() - b0;
                }
            }
            (logits, tokens)
        })
        .collect();
    (run, decode_bytes)
}

/// The prompts evaluated together in one batch, then decoded together, sequence `i` leaving
/// after `steps[i]` tokens; with `late`, the last one joins a step late (its prompt evaluated in
/// the batch of the others' first decode step). Also returns the routed-expert bytes of the
/// rounds that decoded only.
fn together(
    model: &Model,
    prompts: &[Vec<u32>],
    steps: &[usize],
    late: bool,
    cache: Option<&Arc<ExpertCache>>,
) -> (Run, u64) {
    let vocab = model.hp.n_vocab;
    let mut s = session(model, cache);
    let n = prompts.len();
    let mut seqs: Vec<SavedSequence> = (0..n).map(|_| s.blank_sequence()).collect();
    let mut run: Run = vec![(Vec::new(), Vec::new()); n];
    // What each sequence evaluates next: its prompt first.
    let mut pending: Vec<Vec<u32>> = prompts.to_vec();
    let mut decode_bytes = 0;
    let rounds = steps.iter().max().copied().unwrap_or(0) + 1;
    for round in 0..=rounds {
        // Who runs this round: the late one from round 1, each until its last token is out.
        let runs = |i: usize| (!late || i + 1 < n || round > 0) && run[i].1.len() < steps[i];
        let members: Vec<usize> = (0..n).filter(|&i| runs(i)).collect();
        if members.is_empty() {
            break;
        }
        let prompt_round: Vec<bool> = members.iter().map(|&i| run[i].0.is_empty()).collect();
        let b0 = s.expert_bytes_used();
        let logits = {
            let mut batch: Vec<(&mut SavedSequence, &[u32])> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| members.contains(i))
                .map(|(i, seq)| (seq, &pending[i][..]))
                .collect();
            s.forward_batch(&mut batch).unwrap().to_vec()
        };
        if prompt_round.iter().all(|&p| !p) {
            decode_bytes += s.expert_bytes_used() - b0;
        }
        assert_eq!(logits.len(), members.len() * vocab);
        for (row, &i) in logits.chunks_exact(vocab).zip(&members) {
            run[i].0.extend_from_slice(row);
            let next = argmax_logits(row);
            run[i].1.push(next);
            pending[i] = vec![next];
        }
    }
    for (i, (logits, tokens)) in run.iter().enumerate() {
        assert_eq!((logits.len(), tokens.len()), (steps[i] * vocab, steps[i]));
    }
    (run, decode_bytes)
}

fn prompts(model: &Model, fx: &Fixture) -> Vec<Vec<u32>> {
    let vocab = model.hp.n_vocab as u32;
    let mut p: Vec<Vec<u32>> = fx.expected.prompts.iter().map(|c| c.ids.clone()).collect();
    p.push((0..7u32).map(|i| (i * 7919 + 13) % vocab).collect());
    p.truncate(4);
    p
}

#[test]
fn sequences_together_equal_each_alone() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::Q8_0);
        let file = conv.open();
        let model = Model::load(&file).unwrap();
        let prompts = prompts(&model, &fx);
        let steps: Vec<usize> = (0..prompts.len()).map(|i| STEPS - i % 3).collect();
        let (want, _) = alone(&model, &prompts, &steps, None);
        let (got, _) = together(&model, &prompts, &steps, true, None);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.1 == w.1,
                "{name}: sequence {i}'s tokens {:?} alone {:?}",
                g.1,
                w.1
            );
            assert!(
                g.0 == w.0,
                "{name}: sequence {i}'s logits differ from its run alone"
            );
        }

        let n_used = model.hp.n_expert_used;
        let cache = expert_cache(
            &model,
            &conv.path,
            cache_config(n_used + 1, Eviction::Belady),
        );
        let (streamed, _) = together(&model, &prompts, &steps, true, Some(&cache));
        assert!(
            streamed == want,
            "{name}: streamed batch differs from resident runs alone"
        );
        assert!(
            cache.stats().demand_misses > 0,
            "{name}: a small cache must miss"
        );
    }
}

/// The qwen3_moe fixture's figures: routed-expert bytes per decoded token with 4 sequences
/// decoding together against each alone (printed; the batch must need less).
#[test]
fn a_shared_expert_is_read_once_per_step() {
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let prompts = prompts(&model, &fx);
    let steps = vec![STEPS; prompts.len()];
    let decoded = (prompts.len() * (STEPS - 1)) as f64;
    let (_, alone_bytes) = alone(&model, &prompts, &steps, None);
    let (_, together_bytes) = together(&model, &prompts, &steps, false, None);
    println!(
        "expert bytes per decoded token: alone {:.0}, {} together {:.0}",
        alone_bytes as f64 / decoded,
        prompts.len(),
        together_bytes as f64 / decoded
    );
    assert!(together_bytes < alone_bytes);

    // Through the cache: what it reads from the file, alone against together.
    let slots = model.hp.n_expert_used + 1;
    let c1 = expert_cache(&model, &conv.path, cache_config(slots, Eviction::Lru));
    alone(&model, &prompts, &steps, Some(&c1));
    let c2 = expert_cache(&model, &conv.path, cache_config(slots, Eviction::Lru));
    together(&model, &prompts, &steps, false, Some(&c2));
    let (a, t) = (c1.stats(), c2.stats());
    println!(
        "expert cache of {slots} slots: alone {} hits {} misses {} bytes read; together {} hits {} misses {} bytes read",
        a.demand_hits, a.demand_misses, a.bytes_read, t.demand_hits, t.demand_misses, t.bytes_read
    );
    assert!(t.demand_hits + t.demand_misses < a.demand_hits + a.demand_misses);
}

/// Sequences of another shape, or an empty batch, are refused with an error, not a panic.
#[test]
fn mismatched_sequences_are_refused() {
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let mut s = Session::with_kv_type(&model, N_CTX, KvType::F16);
    let other = Session::with_kv_type(&model, N_CTX / 2, KvType::F16);
    let mut wrong = other.blank_sequence();
    assert!(s.forward_batch(&mut [(&mut wrong, &[1u32][..])]).is_err());
    assert!(s.forward_batch(&mut []).is_err());
    let mut right = s.blank_sequence();
    assert!(s
        .forward_batch(&mut [(&mut right, &[u32::MAX][..])])
        .is_err());
    assert!(s.forward_batch(&mut [(&mut right, &[1u32][..])]).is_ok());
    assert_eq!(right.position(), 1);
    // A session whose sequence was taken out runs nothing until one is swapped in.
    let _taken = s.take_sequence();
    assert!(s.forward(&[1], false).is_err());
    s.swap_sequence(&mut right);
    assert!(s.forward(&[2], false).is_ok());
}

/// A model routed by a decoupled router (Read-ME): each sequence's router state goes with it,
/// so its routes, and so its logits, are what it gets alone; streamed too.
#[test]
fn decoupled_router_sequences_together_equal_each_alone() {
    let fx = Fixture::load("qwen3_moe_readme");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    assert!(model.router.is_some());
    let prompts = prompts(&model, &fx);
    assert!(prompts.len() >= 3);
    let steps: Vec<usize> = (0..prompts.len()).map(|i| STEPS - i % 3).collect();
    let (want, _) = alone(&model, &prompts, &steps, None);
    let (got, _) = together(&model, &prompts, &steps, true, None);
    assert!(
        got == want,
        "decoupled-router batch differs from each alone"
    );
    let cache = expert_cache(
        &model,
        &conv.path,
        cache_config(model.hp.n_expert_used + 1, Eviction::Belady),
    );
    let (streamed, _) = together(&model, &prompts, &steps, true, Some(&cache));
    assert!(streamed == want, "streamed decoupled-router batch differs");
}

/// The small trained model (`models/small-moe`, 24 experts, top-4) on four text prompts, 32
/// greedy tokens each: together equals alone, and the figures batching changes, which do not
/// depend on the machine: routed-expert bytes used per decoded token, and through an expert
/// cache holding half of the experts (LRU) the bytes it reads from the file per decoded token.
#[test]
fn small_moe_four_sequences_figures() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/small-moe/small-moe-q8_0.gguf");
    let file = moe_runtime::gguf::GgufFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    let tok = moe_runtime::tokenizer::Tokenizer::from_gguf(file.header()).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "It is a truth universally acknowledged, that a single man",
        "Call me Ishmael. Some years ago, never mind how long",
        "The ship sailed from Nantucket on a cold",
        "Elizabeth walked into the drawing room and",
    ]
    .iter()
    .map(|t| tok.encode(t, false).unwrap())
    .collect();
    let steps = vec![32; prompts.len()];
    let decoded = (prompts.len() * 31) as f64;
    let (want, alone_bytes) = alone(&model, &prompts, &steps, None);
    let (got, together_bytes) = together(&model, &prompts, &steps, false, None);
    assert!(got == want, "small-moe: together differs from alone");
    let layout = model.expert_layout();
    let half = layout.total_expert_bytes() / 2 / layout.slot_bytes();
    let c1 = expert_cache(&model, &path, cache_config(half, Eviction::Lru));
    let c2 = expert_cache(&model, &path, cache_config(half, Eviction::Lru));
    let (a, _) = alone(&model, &prompts, &steps, Some(&c1));
    let (t, _) = together(&model, &prompts, &steps, false, Some(&c2));
    assert!(a == want && t == want, "small-moe: streamed runs differ");
    let (ra, rt) = (c1.stats().bytes_read as f64, c2.stats().bytes_read as f64);
    println!(
        "small-moe, 4 prompts x 32 greedy tokens: routed-expert KiB per decoded token alone {:.1}, \
         4 together {:.1}; expert cache of {half} slots (half the experts, LRU), KiB read from \
         the file per generated token (prompts included): alone {:.1}, together {:.1}",
        alone_bytes as f64 / decoded / 1024.0,
        together_bytes as f64 / decoded / 1024.0,
        ra / (4.0 * 32.0) / 1024.0,
        rt / (4.0 * 32.0) / 1024.0,
    );
    assert!(together_bytes < alone_bytes);
}
