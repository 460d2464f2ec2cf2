//! Expert streaming: runs whose routed experts come through a small expert cache (read from the
//! file with pread) give bit-identical logits and tokens to fully resident runs, whatever the
//! eviction policy, prediction depth or emulated flash speed; and observe the same inputs of
//! every weight (the importance matrix calibration collects).

use moe_e2e::{cache_config, expert_cache, Fixture, FIXTURES};
use moe_runtime::gguf::{GgmlType, GgufFile};
use moe_runtime::model::{ExpertStreaming, KvType, Model, Session};
use moe_runtime::moe::cache::flash::FlashProfile;
use moe_runtime::moe::cache::{CacheConfig, Eviction, ExpertCache};
use moe_runtime::sampling::argmax_logits;

/// Logits of every position of `ids` plus 8 greedy tokens.
fn run(model: &Model, ids: &[u32], streaming: Option<ExpertStreaming>) -> (Vec<f32>, Vec<u32>) {
    let mut s = Session::with_kv_type(model, 256, KvType::F32);
    if let Some(st) = streaming {
        s.set_streaming(st);
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
    (logits, out)
}

#[test]
fn streamed_equals_resident_for_every_architecture() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        for ty in [GgmlType::F32, GgmlType::Q8_0] {
            let conv = fx.convert(ty);
            let file = conv.open();
            let model = Model::load(&file).unwrap();
            let ids = &fx.expected.prompts[2].ids;
            let resident = run(&model, ids, None);
            let n_used = model.hp.n_expert_used;
            for (slots, eviction, lookahead) in [
                (n_used, Eviction::Lru, 0),
                (n_used + 1, Eviction::Lfu, 1),
                (n_used + 2, Eviction::Belady, 2),
                (3 * n_used, Eviction::Belady, 1),
            ] {
                let c = expert_cache(&model, &conv.path, cache_config(slots, eviction));
                let streamed = run(
                    &model,
                    ids,
                    Some(ExpertStreaming {
                        cache: Some(c.clone()),
                        lookahead,
                    }),
                );
                assert!(
                    streamed.0 == resident.0 && streamed.1 == resident.1,
                    "{name} {ty} slots={slots} {eviction:?} lookahead={lookahead}: streamed run differs"
                );
                let st = c.stats();
                assert!(st.demand_misses > 0, "{name}: a small cache must miss");
                // The cache's own accounting: exactly its slots, nothing more.
                assert_eq!(c.memory_bytes(), (slots * c.slot_bytes()).max(4096));
                if lookahead > 0 {
                    assert!(st.prefetches_issued + st.prefetches_skipped > 0);
                }
            }
        }
    }
}

#[test]
fn emulated_slow_flash_changes_time_not_results() {
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let ids = &fx.expected.prompts[1].ids;
    let resident = run(&model, ids, None);
    let slow = FlashProfile {
        name: "test",
        bytes_per_second: 20e6,
        latency: std::time::Duration::from_millis(1),
        faults: Default::default(),
    };
    let c = expert_cache(
        &model,
        &conv.path,
        CacheConfig {
            flash: Some(slow),
            io_threads: 1,
            ..cache_config(3, Eviction::Belady)
        },
    );
    let streamed = run(
        &model,
        ids,
        Some(ExpertStreaming {
            cache: Some(c.clone()),
            lookahead: 1,
        }),
    );
    assert!(streamed == resident);
    let st = c.stats();
    // Experts present were computed while earlier ones of their layer were still read, and
    // the sums still came out bit-identical.
    assert!(st.overtakes > 0, "{st:?}");
    // Every demand miss paid at least the emulated latency.
    assert!(
        st.stall_seconds >= st.demand_misses as f64 * 1e-3 * 0.9,
        "{st:?}"
    );
}

#[test]
fn short_read_is_an_error_not_wrong_output() {
    let fx = Fixture::load("olmoe");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    // The cache reads from a copy cut in the middle of the expert data.
    let first_experts = file
        .header()
        .tensors()
        .iter()
        .find(|t| t.name.ends_with("ffn_gate_exps.weight"))
        .unwrap();
    // `blk.N.ffn_gate_exps.weight`: the layer whose experts are read first and fail.
    let layer = first_experts.name.split('.').nth(1).unwrap().to_owned();
    let first_experts = first_experts.range.clone();
    let cut = conv.path.with_extension("cut.gguf");
    let bytes = std::fs::read(&conv.path).unwrap();
    std::fs::write(&cut, &bytes[..first_experts.start + 100]).unwrap();
    let c = expert_cache(&model, &cut, cache_config(2, Eviction::Lru));
    let mut s = Session::with_kv_type(&model, 64, KvType::F32);
    s.set_streaming(ExpertStreaming {
        cache: Some(c),
        lookahead: 0,
    });
    let err = s
        .forward(&fx.expected.prompts[1].ids, true)
        .expect_err("must fail");
    assert!(err.to_string().contains("past the end"), "{err}");
    // The message names the expert whose read failed and the file it was read from.
    let named = format!(" of layer {layer} from {} failed", cut.display());
    assert!(
        err.to_string().contains("reading expert ") && err.to_string().contains(&named),
        "{err}"
    );
    assert!(!err.to_string().contains("4294967295"), "{err}");
}

#[test]
fn lookahead_predictions_are_scored() {
    let fx = Fixture::load("mixtral");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = GgufFile::open(&conv.path).unwrap();
    let model = Model::load(&file).unwrap();
    let c = expert_cache(&model, &conv.path, cache_config(4, Eviction::Belady));
    let mut s = Session::with_kv_type(&model, 64, KvType::F32);
    s.set_streaming(ExpertStreaming {
        cache: Some(c),
        lookahead: 2,
    });
    s.forward(&fx.expected.prompts[2].ids, false).unwrap();
    let p = s.prediction_stats();
    assert_eq!(p.len(), 2);
    // 3 layers: depth 1 predicts layers 1 and 2, depth 2 predicts layer 2.
    assert!(p[0].predicted > 0 && p[0].actual > 0 && p[1].predicted > 0);
    assert!(p[0].precision() <= 1.0 && p[0].recall() <= 1.0);
}

/// SmallThinker's router reads the layer input: each layer's experts are read as soon as it has
/// routed, before its attention. Those reads are exactly the experts the layer then uses (every
/// one, none more), the slow device's time is partly hidden behind the attention, and the
/// output is bit for bit the demand-loaded one and the resident one.
#[test]
fn smallthinker_reads_experts_at_router_time_exactly() {
    let fx = Fixture::load("smallthinker");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let ids = &fx.expected.prompts[2].ids;
    let resident = run(&model, ids, None);
    let n_used = model.hp.n_expert_used;
    for router_prefetch in [false, true] {
        let c = expert_cache(
            &model,
            &conv.path,
            cache_config(n_used + 1, Eviction::Belady),
        );
        let mut s = Session::with_kv_type(&model, 256, KvType::F32);
        s.set_streaming(ExpertStreaming {
            cache: Some(c.clone()),
            lookahead: 0,
        });
        s.set_router_prefetch(router_prefetch);
        let mut logits = s.forward(ids, true).unwrap().to_vec();
        let vocab = model.hp.n_vocab;
        let mut next = argmax_logits(&logits[logits.len() - vocab..]);
        let mut tokens = vec![next];
        for _ in 0..7 {
            let l = s.forward(&[next], false).unwrap().to_vec();
            next = argmax_logits(&l);
            logits.extend_from_slice(&l);
            tokens.push(next);
        }
        assert!(
            logits == resident.0 && tokens == resident.1,
            "router prefetch {router_prefetch}: streamed run differs"
        );
        let p = s.router_prefetch_stats();
        let st = c.stats();
        if router_prefetch {
            // 3 layers x (1 prompt batch + 7 decode steps), every layer MoE.
            assert_eq!(p.by_layer.len(), 3);
            assert!(p.actual > 0);
            assert_eq!((p.correct, p.predicted), (p.actual, p.actual), "{p:?}");
            assert!(st.prefetches_issued > 0 && st.prefetches_used > 0, "{st:?}");
        } else {
            assert_eq!((p.predicted, st.prefetches_issued), (0, 0));
        }
    }
}

/// Holds `experts` of `layer` until every one of them is loaded, then lets them go.
fn use_experts(c: &ExpertCache, layer: usize, experts: &[u32]) {
    let mut arrivals = c.acquire_each(layer, experts).unwrap();
    let guards: Vec<_> = (0..experts.len())
        .map(|i| {
            arrivals
                .take(i, true)
                .unwrap()
                .expect("a waiting take returns it")
        })
        .collect();
    drop(guards);
}

/// A guess that did not come true must not keep its expert: once its predicted step has passed
/// without a use, Belady judges it by its use estimate again. (It used to keep ranking as
/// "needed now" until its next real use, holding a slot for nothing.)
#[test]
fn a_wrong_guess_does_not_keep_its_expert() {
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let c = expert_cache(&model, &conv.path, cache_config(2, Eviction::Belady));
    let layer = (0..model.hp.n_layer)
        .find(|&l| c.layout().is_moe_layer(l))
        .unwrap();
    for token in 0..4 {
        c.set_position(token, layer);
        if token == 0 {
            // Guess expert 1 for this visit; the router will pick expert 0 instead.
            c.prefetch(layer, &[1], c.step_of(token, layer));
        }
        c.record_use(layer, &[0]);
        use_experts(&c, layer, &[0]);
    }
    assert!(c.contains(layer, 0) && c.contains(layer, 1));
    // A slot still being read cannot be evicted: let the guess's read finish first.
    let both = (c.layout().expert_bytes(layer, 0) + c.layout().expert_bytes(layer, 1)) as u64;
    let t0 = std::time::Instant::now();
    while c.stats().bytes_read < both {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the guessed expert never loaded"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // A new expert needs a slot: the wrong guess goes, the expert in use stays.
    c.set_position(4, layer);
    c.record_use(layer, &[2]);
    use_experts(&c, layer, &[2]);
    assert!(
        c.contains(layer, 0),
        "the expert used at every visit was evicted"
    );
    assert!(!c.contains(layer, 1), "the wrong guess kept its slot");
}

/// MXFP4 expert slabs (17-byte blocks) are not whole pages and start anywhere in a page: with
/// O_DIRECT the cache reads page-aligned spans around them, and the result is still the
/// resident run's, bit for bit.
#[test]
fn mxfp4_experts_stream_with_direct_io() {
    let fx = Fixture::load("gpt_oss");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let layout = model.expert_layout();
    let slab = file
        .header()
        .tensor("blk.0.ffn_gate_exps.weight")
        .unwrap()
        .range
        .clone();
    assert!(
        !((slab.end - slab.start) / model.hp.n_expert).is_multiple_of(4096),
        "the test needs slabs that are not whole pages"
    );
    let ids = &fx.expected.prompts[3].ids;
    let resident = run(&model, ids, None);
    for slots in [model.hp.n_expert_used, 5] {
        let cfg = CacheConfig {
            direct_io: true,
            ..cache_config(slots, Eviction::Belady)
        };
        let c = match ExpertCache::new(model.expert_layout(), 2, &conv.path, cfg) {
            Ok(c) => std::sync::Arc::new(c),
            // tmpfs refuses O_DIRECT; the reads' alignment is then untestable here.
            Err(e) if e.to_string().contains("Invalid argument") => {
                eprintln!("skipped: the temporary folder refuses O_DIRECT ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let streamed = run(
            &model,
            ids,
            Some(ExpertStreaming {
                cache: Some(c.clone()),
                lookahead: 1,
            }),
        );
        assert!(streamed == resident, "slots={slots}: streamed run differs");
        let st = c.stats();
        assert!(st.demand_misses > 0);
        assert!(st.bytes_read >= layout.expert_bytes(0, 0) as u64);
    }
}

/// The inputs of every weight summed over `ids` (an importance matrix), by tensor name.
fn input_sums(
    model: &Model,
    ids: &[u32],
    streaming: Option<ExpertStreaming>,
) -> Vec<moe_runtime::model::NamedInputSum> {
    let mut s = Session::with_kv_type(model, 256, KvType::F32);
    if let Some(st) = streaming {
        s.set_streaming(st);
    }
    s.set_input_sums(true);
    s.forward(ids, false).unwrap();
    s.take_input_sums().unwrap().named(model.file.header())
}

#[test]
fn streamed_runs_observe_the_same_weight_inputs() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::F32);
        let file = conv.open();
        let model = Model::load(&file).unwrap();
        let ids = &fx.expected.prompts[2].ids;
        let resident = input_sums(&model, ids, None);
        assert!(
            resident.iter().any(|e| e.name.ends_with("_exps.weight")),
            "{name}: no expert inputs observed"
        );
        let n_used = model.hp.n_expert_used;
        for (slots, eviction) in [(n_used, Eviction::Lru), (3 * n_used, Eviction::Belady)] {
            let c = expert_cache(&model, &conv.path, cache_config(slots, eviction));
            let streaming = ExpertStreaming {
                cache: Some(c),
                lookahead: 1,
            };
            let streamed = input_sums(&model, ids, Some(streaming));
            assert!(
                streamed == resident,
                "{name} slots={slots}: the streamed run observed other inputs"
            );
        }
    }
}

/// The experts of every MoE layer and position the model routed `ids` to (trace order:
/// `[position, MoE layer, k]`), traced by a session of its own.
fn traced_experts(model: &Model, ids: &[u32]) -> Vec<i32> {
    let mut s = Session::with_kv_type(model, 256, KvType::F32);
    s.set_route_tracing(true);
    s.forward(ids, true).unwrap();
    let layers = model.moe_layers();
    let k = model.hp.n_expert_used;
    let mut out = vec![-1i32; ids.len() * layers.len() * k];
    for rec in s.take_route_trace() {
        let c = layers.iter().position(|&l| l == rec.layer).unwrap();
        for (t, r) in rec.routes.iter().enumerate() {
            let at = ((rec.first_pos + t) * layers.len() + c) * k;
            for (j, &e) in r.experts.iter().enumerate() {
                out[at + j] = e as i32;
            }
        }
    }
    assert!(out.iter().all(|&e| e >= 0), "every position traced");
    out
}

fn write_trace(
    dir: &std::path::Path,
    name: &str,
    experts: &[i32],
    shape: [usize; 3],
) -> std::path::PathBuf {
    let prefix = dir.join(name);
    let file = std::fs::File::create(dir.join(format!("{name}.experts.npy"))).unwrap();
    moe_runtime::npy::write_i32(file, experts, &shape).unwrap();
    prefix
}

/// Every traced route uses the experts of `trace` (int32 `[rows, MoE layers, k]`) at row
/// `first_row + position`.
fn assert_routes_follow(
    model: &Model,
    traced: Vec<moe_runtime::model::LayerRouting>,
    trace: &[i32],
    first_row: usize,
    what: &str,
) {
    let (cols, k) = (model.moe_layers(), model.hp.n_expert_used);
    for rec in traced {
        let c = cols.iter().position(|&l| l == rec.layer).unwrap();
        for (t, r) in rec.routes.iter().enumerate() {
            let at = ((first_row + rec.first_pos + t) * cols.len() + c) * k;
            let want: Vec<u32> = trace[at..at + k].iter().map(|&e| e as u32).collect();
            assert_eq!(
                &r.experts[..],
                &want[..],
                "{what} layer {} token {t}",
                rec.layer
            );
        }
    }
}

#[test]
fn replayed_routing_is_the_routers_own_for_its_trace_and_the_traces_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::F32);
        let file = conv.open();
        let model = Model::load(&file).unwrap();
        let ids = &fx.expected.prompts[2].ids;
        let (n, layers, k) = (ids.len(), model.moe_layers().len(), model.hp.n_expert_used);
        let own = traced_experts(&model, ids);
        let prefix = write_trace(dir.path(), name, &own, [n, layers, k]);
        let prompt_logits =
            |replay: Option<&std::path::Path>, cache: Option<std::sync::Arc<ExpertCache>>| {
                let mut s = Session::with_kv_type(&model, 256, KvType::F32);
                s.set_route_replay(replay.map(|p| model.route_replay(p).unwrap()));
                s.set_streaming(ExpertStreaming {
                    cache,
                    lookahead: 0,
                });
                s.set_route_tracing(true);
                let logits = s.forward(ids, true).unwrap().to_vec();
                (logits, s.take_route_trace())
            };
        // A trace of the model's own routing replays it exactly: same weights, same logits.
        let (resident, _) = prompt_logits(None, None);
        let (replayed, _) = prompt_logits(Some(&prefix), None);
        assert!(
            replayed == resident,
            "{name}: replaying its own trace changed the logits"
        );

        // After a reset the next sequence continues the trace where the last one ended, so a
        // benchmark's measured run does not replay its warm-up's tokens.
        let m = n / 2;
        let mut s = Session::with_kv_type(&model, 256, KvType::F32);
        s.set_route_replay(Some(model.route_replay(&prefix).unwrap()));
        s.forward(&ids[..m], true).unwrap();
        s.reset();
        s.set_route_tracing(true);
        s.forward(&ids[..n - m], true).unwrap();
        let second = s.take_route_trace();
        assert!(!second.is_empty(), "{name}: no routing traced");
        assert_routes_follow(&model, second, &own, m, &format!("{name} second sequence"));

        // Another trace (positions shifted by one) routes every token to the trace's experts.
        let shifted: Vec<i32> = (0..n)
            .flat_map(|t| own[((t + 1) % n) * layers * k..][..layers * k].to_vec())
            .collect();
        let other = write_trace(
            dir.path(),
            &format!("{name}-shifted"),
            &shifted,
            [n, layers, k],
        );
        let (changed, routed) = prompt_logits(Some(&other), None);
        assert!(
            changed != resident,
            "{name}: a different trace left the logits unchanged"
        );
        assert_routes_follow(&model, routed, &shifted, 0, name);
        // ... and a streamed run of that replay equals the resident one.
        let c = expert_cache(&model, &conv.path, cache_config(k + 1, Eviction::Belady));
        let (streamed, _) = prompt_logits(Some(&other), Some(c));
        assert!(
            streamed == changed,
            "{name}: streamed replay differs from resident"
        );
    }
    // A trace of another shape is refused with what to do.
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let (layers, k) = (model.moe_layers().len(), model.hp.n_expert_used);
    let wrong = write_trace(
        dir.path(),
        "wrong-k",
        &vec![0; 3 * layers * (k + 1)],
        [3, layers, k + 1],
    );
    let err = model.route_replay(&wrong).unwrap_err().to_string();
    assert!(err.contains("moe-run trace"), "{err}");
    let twice = write_trace(
        dir.path(),
        "twice",
        &vec![0; 3 * layers * k],
        [3, layers, k],
    );
    let err = model.route_replay(&twice).unwrap_err().to_string();
    assert!(err.contains("appears twice"), "{err}");
    let err = model
        .route_replay(&dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.experts.npy"), "{err}");
}

#[test]
fn prompts_cut_into_batches_give_the_same_logits() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::Q8_0);
        let file = conv.open();
        let model = Model::load(&file).unwrap();
        let ids = &fx.expected.prompts[2].ids;
        assert!(
            ids.len() > 4,
            "{name}: the prompt must span several batches"
        );
        let run = |max_batch: usize, all: bool| {
            let mut s = Session::with_kv_type(&model, 256, KvType::F32);
            s.set_max_batch(max_batch);
            let mut logits = s.forward(ids, all).unwrap().to_vec();
            assert_eq!(s.last_logits(), &logits[..]);
            let next = argmax_logits(&logits[logits.len() - model.hp.n_vocab..]);
            logits.extend_from_slice(s.forward(&[next], false).unwrap());
            assert_eq!(s.position(), ids.len() + 1);
            logits
        };
        for all in [true, false] {
            let whole = run(ids.len(), all);
            for max_batch in [1, 3, ids.len() - 1] {
                assert!(
                    run(max_batch, all) == whole,
                    "{name}: batches of {max_batch} (all logits: {all}) differ from one batch"
                );
            }
        }
    }
}
