//! Decode steps do not allocate: once a session has run its prompt and a few tokens, every
//! further single-token forward pass (attention over a growing context, routing, experts on the
//! thread pool, the output projection) reuses the session's buffers. Counted by a global
//! allocator on the counting test's thread and the pool's workers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use moe_e2e::{cache_config, expert_cache, Fixture};
use moe_runtime::gguf::{GgmlType, GgufFile};
use moe_runtime::model::{ExpertStreaming, KvType, Model, Session};
use moe_runtime::moe::cache::Eviction;
use moe_runtime::moe::predictor::{ExpertPredictor, GruPredictor, Predictions};
use moe_runtime::sampling::argmax_logits;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the threads whose allocations count. The test harness's own thread must not
    /// count: it reports a finished test and starts the next one while this test counts.
    static COUNTED_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn count_one() {
    let counted = COUNTED_THREAD.try_with(Cell::get).unwrap_or(false);
    if counted && COUNTING.load(Ordering::Relaxed) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Counts the allocations `work` makes on this thread and on rayon's global pool.
fn allocations_in(work: impl FnOnce()) -> usize {
    // Workers of the global pool serve only the test holding `ONE_AT_A_TIME`, so they stay
    // marked; `broadcast` allocates, so it runs before counting starts.
    rayon::broadcast(|_| COUNTED_THREAD.set(true));
    COUNTED_THREAD.set(true);
    ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    work();
    COUNTING.store(false, Ordering::SeqCst);
    COUNTED_THREAD.set(false);
    ALLOCS.load(Ordering::SeqCst)
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The count sees every thread of the process: each test holds this for its whole run, so that
/// no other test allocates while one counts.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Allocations made by 16 greedy decode steps after a prompt and 2 warm-up steps, with the KV
/// cache in `kv`.
fn decode_allocations(file: &GgufFile, kv: KvType) -> usize {
    let model = Model::load(file).expect("model loads");
    let mut s = Session::with_kv_type(&model, 128, kv);
    count_decode(&mut s)
}

fn count_decode(s: &mut Session) -> usize {
    let prompt: Vec<u32> = (1..12).collect();
    let mut next = argmax_logits(s.forward(&prompt, false).expect("prompt"));
    for _ in 0..2 {
        next = argmax_logits(s.forward(&[next], false).expect("warm-up step"));
    }
    // Counted on a pool thread: a call from outside the pool hands rayon's injector a job, and
    // its queue allocates a small block once every 63 such calls (rayon's, not ours).
    let mut n = 0;
    rayon::scope(|_| {
        n = allocations_in(|| {
            for _ in 0..16 {
                next = argmax_logits(s.forward(&[next], false).expect("decode step"));
            }
        })
    });
    n
}

#[test]
fn trained_model_decodes_without_allocating() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/small-moe/small-moe-q8_0.gguf");
    let file = GgufFile::open(&path).expect("bundled model opens");
    for kv in [KvType::F16, KvType::F32] {
        let n = decode_allocations(&file, kv);
        assert_eq!(n, 0, "{n} allocations in 16 decode steps ({kv:?} KV cache)");
    }
}

#[test]
fn k_quant_file_decodes_without_allocating() {
    // Q4_K/Q6_K weights take Q8_K activations, made lazily per batch in a reused buffer.
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = moe_e2e::fixtures_dir().join("qwen3_moe_q4_k_m/model.gguf");
    let file = GgufFile::open(&path).expect("Q4_K_M fixture opens");
    let n = decode_allocations(&file, KvType::F16);
    assert_eq!(n, 0, "{n} allocations in 16 decode steps (Q4_K_M)");
}

#[test]
fn every_ffn_kind_decodes_without_allocating() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Shared experts (qwen2_moe), MLA and group routing (deepseek_v3), a plain MoE (mixtral),
    // routing decided by a decoupled router (qwen3_moe_readme), partial rotary with biases and
    // q/k norm (glm4_moe), softmax routing with a selection bias (ernie4_5_moe), routing from
    // the layer input, ReGLU and NoPE/sliding layers (smallthinker), a dense MLP beside the
    // experts with sandwich norms and per-layer head sizes (gemma4), short convolutions with
    // their recurrent state beside attention layers (lfm2_moe), Gated DeltaNets with gated
    // attention and a gated shared expert (qwen35_moe), Mamba-2 layers beside NoPE attention
    // (granite_hybrid).
    for name in [
        "qwen2_moe",
        "deepseek_v3",
        "mixtral",
        "qwen3_moe_readme",
        "glm4_moe",
        "ernie4_5_moe",
        "smallthinker",
        "gemma4",
        "lfm2_moe",
        "qwen35_moe",
        "granite_hybrid",
    ] {
        for ty in [GgmlType::Q8_0, GgmlType::F32] {
            let converted = Fixture::load(name).convert(ty);
            let n = decode_allocations(&converted.open(), KvType::F16);
            assert_eq!(n, 0, "{name} {ty:?}: {n} allocations in 16 decode steps");
        }
    }
}

/// LFM2-MoE, Qwen3.5-MoE and Granite-4.0-H: a snapshot of the recurrent state (conv inputs,
/// DeltaNet matrices, Mamba-2 scan states) and a rewind to it (what moed's prompt cache does between requests) allocate
/// nothing either.
#[test]
fn recurrent_snapshot_and_rewind_allocate_nothing() {
    for name in ["lfm2_moe", "qwen35_moe", "granite_hybrid"] {
        snapshot_and_rewind_allocate_nothing(name);
    }
}

fn snapshot_and_rewind_allocate_nothing(name: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let converted = Fixture::load(name).convert(GgmlType::Q8_0);
    let file = converted.open();
    let model = Model::load(&file).expect("model loads");
    let mut s = Session::with_kv_type(&model, 128, KvType::F16);
    assert_eq!(count_decode(&mut s), 0);
    let mut n = usize::MAX;
    rayon::scope(|_| {
        n = allocations_in(|| {
            s.snapshot();
            let at = s.position();
            for _ in 0..4 {
                let next = argmax_logits(s.forward(&[7], false).expect("decode step"));
                s.forward(&[next], false).expect("decode step");
                s.rewind(at).expect("rewind to the snapshot");
            }
        })
    });
    assert_eq!(
        n, 0,
        "{name}: {n} allocations in snapshot, decode and rewind"
    );
}

/// gpt-oss: attention sinks, biases, the clamped SwiGLU, MXFP4 experts, and sliding-window
/// layers whose ring of keys wraps around during the counted steps (window 8: a prompt of 40
/// positions and 18 more pass the ring's 39 slots), resident and streamed.
#[test]
fn gpt_oss_decodes_without_allocating() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let converted = Fixture::load("gpt_oss").convert(GgmlType::Q8_0);
    let file = converted.open();
    let model = Model::load(&file).expect("model loads");
    let prompt: Vec<u32> = (1..41).collect();
    for streamed in [false, true] {
        let mut s = Session::with_kv_type(&model, 128, KvType::F16);
        if streamed {
            let cache = expert_cache(&model, &converted.path, cache_config(3, Eviction::Belady));
            s.set_streaming(ExpertStreaming {
                cache: Some(cache),
                lookahead: 1,
            });
        }
        let mut next = argmax_logits(s.forward(&prompt, false).expect("prompt"));
        for _ in 0..2 {
            next = argmax_logits(s.forward(&[next], false).expect("warm-up step"));
        }
        let mut n = 0;
        rayon::scope(|_| {
            n = allocations_in(|| {
                for _ in 0..16 {
                    next = argmax_logits(s.forward(&[next], false).expect("decode step"));
                }
            })
        });
        assert_eq!(
            n, 0,
            "streamed {streamed}: {n} allocations in 16 decode steps"
        );
    }
}

#[test]
fn streamed_experts_decode_without_allocating() {
    // Misses, evictions, demand reads overtaking queued guesses: the cache's bookkeeping and the
    // forward pass's handling of experts as they arrive reuse their buffers too.
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/small-moe/small-moe-q8_0.gguf");
    let file = GgufFile::open(&path).expect("bundled model opens");
    let model = Model::load(&file).expect("model loads");
    let experts = model.hp.n_layer * model.hp.n_expert;
    let setups = [
        (Eviction::Belady, 0, false),
        (Eviction::Belady, 2, false),
        (Eviction::Lru, 1, false),
        (Eviction::Belady, 0, true),
    ];
    for (eviction, lookahead, pregate) in setups {
        let cache = expert_cache(&model, &path, cache_config(experts / 2, eviction));
        let mut s = Session::with_kv_type(&model, 128, KvType::F16);
        s.set_streaming(ExpertStreaming {
            cache: Some(cache.clone()),
            lookahead,
        });
        if pregate {
            let onnx = path.with_file_name("small-moe-q8_0.pregate.onnx");
            let router = GruPredictor::load(&onnx, model.hp.n_layer, model.hp.n_expert, None)
                .expect("bundled router loads");
            s.set_predictor(Some(Box::new(router)));
        }
        let n = count_decode(&mut s);
        assert!(
            cache.stats().demand_misses > 0,
            "half the experts must miss"
        );
        assert_eq!(
            n, 0,
            "{eviction:?} lookahead {lookahead} pre-gating {pregate}: {n} allocations in 16 \
             streamed decode steps"
        );
    }
}

/// SmallThinker's experts read at router time, before attention (`fetch_ahead`), through a
/// cache holding half of them.
#[test]
fn router_time_reads_decode_without_allocating() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let converted = Fixture::load("smallthinker").convert(GgmlType::Q8_0);
    let file = converted.open();
    let model = Model::load(&file).expect("model loads");
    let experts = model.hp.n_layer * model.hp.n_expert;
    let cache = expert_cache(
        &model,
        &converted.path,
        cache_config(experts / 2, Eviction::Belady),
    );
    let mut s = Session::with_kv_type(&model, 128, KvType::F16);
    s.set_streaming(ExpertStreaming {
        cache: Some(cache.clone()),
        lookahead: 0,
    });
    let n = count_decode(&mut s);
    assert!(
        cache.stats().prefetches_issued > 0,
        "experts read at router time"
    );
    assert_eq!(
        n, 0,
        "{n} allocations in 16 streamed SmallThinker decode steps"
    );
}

#[test]
fn pregate_router_predicts_without_allocating() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let onnx = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/small-moe/small-moe-q8_0.pregate.onnx");
    let mut p = GruPredictor::load(&onnx, 6, 24, None).expect("bundled router loads");
    let mut out = Predictions::default();
    p.predict(&[1, 2, 3], 0, &mut out).expect("prompt");
    p.predict(&[4], 3, &mut out).expect("warm-up step");
    let n = allocations_in(|| {
        for i in 0..16u32 {
            p.predict(&[5 + i], 4 + i as usize, &mut out)
                .expect("decode step");
        }
    });
    assert_eq!(n, 0, "{n} allocations in 16 pre-gating steps");
    assert_eq!(out.experts(0, 5).len(), 4);
}
