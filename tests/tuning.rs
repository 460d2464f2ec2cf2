//! Calibration-driven conversions and lossy routing options:
//! - pruning by an explicit list removes exactly those experts, and the pruned file matches
//!   transformers run with the same experts masked out of their routers (tests/fixtures/
//!   qwen3_moe/pruned.json, from scripts/fixtures/make_fixtures.py);
//! - a mixed-precision (per-expert types) file loads, each expert dequantizes to its own type's
//!   round trip of the source weights, and the model matches its dequantized reference;
//! - `--target-size` fills its budget without passing it, stores each expert matrix at the
//!   type it chose (its round trip of the source weights), spends more bits on the experts whose
//!   removal costs most, and its stacked variant keeps llama.cpp's layout;
//! - the lossy routing options are off by default and change nothing when off;
//! - calibration collects an importance matrix for every weight of every fixture's
//!   architecture that llama-quantize quantizes (convert/tests/llama_imatrix.rs compares one
//!   with llama-imatrix's).

use std::path::Path;
use std::sync::Arc;

use moe_convert::{convert, CalibOptions, ConvertOptions, ExpertTypes, PruneSpec, Tuning};
use moe_e2e::{
    cache_config, cosine, expert_cache, greedy, max_rel_diff, prompt_logits, Fixture, FIXTURES,
};
use moe_runtime::gguf::{GgmlType, GgufFile, GgufWriter, TensorDecl};
use moe_runtime::model::{ExpertStreaming, Ffn, KvType, Model, Session};
use moe_runtime::moe::cache::{CacheConfig, Eviction, ExpertCache};
use moe_runtime::moe::calib::{self, CalibStats};
use moe_runtime::moe::lossy::RouteOptions;

#[derive(serde::Deserialize)]
struct Pruned {
    drop: Vec<(usize, usize)>,
    prompts: Vec<moe_e2e::PromptCase>,
}

fn tuned(fx: &Fixture, dir: &Path, name: &str, ty: GgmlType, tuning: &Tuning) -> GgufFile {
    let path = dir.join(name);
    let opts = ConvertOptions {
        tuning: Some(tuning.clone()),
        ..ConvertOptions::new(ty)
    };
    convert(&fx.dir, &path, &opts, &|_, _, _| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
    GgufFile::open(&path).unwrap()
}

/// `drop:L:E,...` for these (layer, expert) pairs.
fn drop_list(drop: &[(usize, usize)]) -> PruneSpec {
    let spec = drop
        .iter()
        .map(|(l, e)| format!("{l}:{e}"))
        .collect::<Vec<_>>()
        .join(",");
    PruneSpec::parse(&format!("drop:{spec}")).unwrap()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn pruning_by_list_matches_transformers_with_experts_masked() {
    let fx = Fixture::load("qwen3_moe");
    let pruned: Pruned = serde_json::from_str(
        &std::fs::read_to_string(fx.dir.join("pruned.json")).expect("pruned.json"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        prune: Some(drop_list(&pruned.drop)),
        ..Default::default()
    };
    let file = tuned(&fx, dir.path(), "pruned.gguf", GgmlType::F32, &tuning);
    let full_conv = fx.convert(GgmlType::F32);
    let full = full_conv.open();

    // Exactly the listed experts are gone: counts, router rows and expert slabs.
    let h = file.header();
    let n_full = 8;
    let n_kept = n_full - 2;
    assert_eq!(
        h.get("qwen3moe.expert_count").unwrap().as_u64(),
        Some(n_kept as u64)
    );
    assert_eq!(
        h.get("qwen3moe.expert_used_count").unwrap().as_u64(),
        Some(2)
    );
    let ids: Vec<u64> = h
        .get(calib::KEY_EXPERT_IDS)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    for l in 0..3 {
        let kept: Vec<usize> = (0..n_full)
            .filter(|e| !pruned.drop.contains(&(l, *e)))
            .collect();
        assert_eq!(kept.len(), n_kept);
        assert_eq!(
            &ids[l * n_kept..(l + 1) * n_kept],
            &kept.iter().map(|&e| e as u64).collect::<Vec<_>>()[..]
        );
        for t in [
            "ffn_gate_inp",
            "ffn_gate_exps",
            "ffn_up_exps",
            "ffn_down_exps",
        ] {
            let name = format!("blk.{l}.{t}.weight");
            let a = h.tensor(&name).unwrap();
            let b = full.header().tensor(&name).unwrap();
            assert_eq!(*a.dims.last().unwrap(), n_kept, "{name}");
            let (va, vb) = (f32s(file.tensor_bytes(a)), f32s(full.tensor_bytes(b)));
            let per = vb.len() / n_full;
            for (i, &e) in kept.iter().enumerate() {
                assert_eq!(
                    va[i * per..(i + 1) * per],
                    vb[e * per..(e + 1) * per],
                    "{name}: slot {i} must be original expert {e}"
                );
            }
        }
    }

    // And the model equals transformers with those router logits at -inf.
    for (i, case) in pruned.prompts.iter().enumerate() {
        let f = std::fs::File::open(fx.dir.join(&case.logits_file)).unwrap();
        let (want, n, vocab) = moe_runtime::npy::read_f32_2d(std::io::BufReader::new(f)).unwrap();
        assert_eq!(n, case.ids.len());
        let got = prompt_logits(&file, &case.ids);
        let diff = max_rel_diff(&got, &want, vocab);
        let (unpruned, _, _) = fx.logits(i);
        let change = max_rel_diff(&unpruned, &want, vocab);
        println!("prompt {i}: pruned vs masked transformers {diff:.2e} (pruning itself changes logits by {change:.2e})");
        assert!(diff < 1e-4, "prompt {i}: pruned logits differ by {diff:e}");
        assert!(
            change > 5e-3,
            "the dropped experts must matter for this test to mean anything"
        );
        assert_eq!(
            greedy(&file, &case.ids, case.greedy_ids.len()),
            case.greedy_ids
        );
    }
}

/// Calibration text for the fixtures: their README (the tokenizer covers any bytes).
fn calib_text() -> CalibOptions {
    CalibOptions {
        text: moe_e2e::fixtures_dir().join("README.md"),
        max_tokens: 1024,
        kl_tokens: 64,
        window: 128,
    }
}

#[test]
fn mixed_precision_file_loads_and_matches_its_dequantized_reference() {
    let fx = Fixture::load("qwen3_moe");
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        calib: Some(calib_text()),
        expert_types: Some(ExpertTypes::parse("hot=q8_0,cold=q4_0", 0.25).unwrap()),
        ..Default::default()
    };
    let file = tuned(&fx, dir.path(), "mixed.gguf", GgmlType::Q8_0, &tuning);
    let h = file.header();
    assert_eq!(
        h.get(calib::KEY_LAYOUT).and_then(|v| v.as_str()),
        Some(calib::LAYOUT_PER_EXPERT)
    );
    assert!(h.tensor("blk.0.ffn_gate_exps.weight").is_none());
    let stats = CalibStats::from_header(h, 3, 8)
        .unwrap()
        .expect("stats stored");
    assert!(stats.tokens > 100);
    let model = Model::load(&file).expect("mixed file loads");

    // Every expert matrix is its type's round trip of the source weights; the 2 most used
    // experts of each layer (25% of 8) are q8_0.
    let full_conv = fx.convert(GgmlType::F32);
    let full = full_conv.open();
    for (l, layer) in model.layers.iter().enumerate() {
        let Ffn::Moe(moe) = &layer.ffn else { panic!() };
        let hot: Vec<usize> = stats.by_frequency(l).into_iter().take(2).collect();
        for (t, m) in [
            ("ffn_gate_exps", &moe.experts.gate),
            ("ffn_up_exps", &moe.experts.up),
            ("ffn_down_exps", &moe.experts.down),
        ] {
            let src = f32s(
                full.tensor_bytes(
                    full.header()
                        .tensor(&format!("blk.{l}.{t}.weight"))
                        .unwrap(),
                ),
            );
            let per = src.len() / 8;
            for e in 0..8 {
                let want_ty = if hot.contains(&e) {
                    GgmlType::Q8_0
                } else {
                    GgmlType::Q4_0
                };
                assert_eq!(m.slabs[e].ty, want_ty, "layer {l} {t} expert {e}");
                let values = &src[e * per..(e + 1) * per];
                let mut want = vec![0f32; per];
                let q = moe_runtime::tensor::quant::quantize(want_ty, values);
                moe_runtime::tensor::quant::dequantize(want_ty, &q, &mut want);
                let mut got = vec![0f32; per];
                moe_runtime::tensor::quant::dequantize(want_ty, m.slabs[e].data, &mut got);
                assert_eq!(got, want, "layer {l} {t} expert {e}");
            }
        }
    }

    // The dequantized reference: every tensor of the mixed file decoded to f32, experts
    // stacked again (the plain llama.cpp layout).
    let reference = dir.path().join("dequantized.gguf");
    dequantize_file(&file, &reference);
    let refile = GgufFile::open(&reference).unwrap();
    let vocab = model.hp.n_vocab;
    for case in &fx.expected.prompts {
        let got = prompt_logits(&file, &case.ids);
        let want = prompt_logits(&refile, &case.ids);
        let cos = cosine(&got, &want);
        let diff = max_rel_diff(&got, &want, vocab);
        println!("mixed vs dequantized reference: cosine {cos:.6}, max rel diff {diff:.2e}");
        // Only the activations' q8_0 rounding (done for quantized weights, not f32) differs.
        assert!(cos > 0.9995, "cosine {cos}");
        assert!(diff < 2e-2, "max rel diff {diff}");
    }

    // Streamed through a small cache (slots sized for the larger q8_0 experts) it is
    // bit-identical to the resident run.
    let ids = &fx.expected.prompts[2].ids;
    let resident = session_logits(&model, ids, None, RouteOptions::default());
    let cache = small_cache(&model, &dir.path().join("mixed.gguf"), 3);
    let streamed = session_logits(&model, ids, Some(cache.clone()), RouteOptions::default());
    assert_eq!(resident, streamed);
    // An expert's three matrices are adjacent in the file: one read request per expert loaded
    // (a stacked file needs three).
    let st = cache.stats();
    assert!(st.demand_misses > 0);
    assert_eq!(st.read_requests, st.demand_misses + st.prefetches_issued);
}

/// Bits per weight of a type, from its block size.
fn bits(ty: GgmlType) -> f64 {
    ty.block_bytes() as f64 * 8.0 / ty.block_len() as f64
}

#[test]
fn target_size_spends_its_budget_on_the_experts_that_matter() {
    use moe_convert::budget::{Granularity, Target};
    let fx = Fixture::load("qwen3_moe");
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, bytes: u64, g: Granularity| {
        let path = dir.path().join(name);
        let opts = ConvertOptions {
            tuning: Some(Tuning {
                calib: Some(calib_text()),
                target: Some((Target::Bytes(bytes), g)),
                ..Default::default()
            }),
            ..ConvertOptions::new(GgmlType::Q8_0)
        };
        let summary =
            convert(&fx.dir, &path, &opts, &|_, _, _| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
        let t = summary.tuned.expect("tuned");
        (
            path,
            t.allocation.expect("allocated"),
            t.stats.expect("stats"),
        )
    };
    // The fixture's experts are small (64 x 32): per-expert tensors are page-aligned, so a
    // matrix takes one page at any of its types and only the stacked layout can show a budget
    // choosing between them.
    let full = run("q8.gguf", u64::MAX / 2, Granularity::Stacked).1;
    let tight_budget = full.fixed_bytes + (full.expert_bytes * 4) / 5;
    let (path, a, stats) = run("tight.gguf", tight_budget, Granularity::Stacked);
    let size = std::fs::metadata(&path).unwrap().len();
    println!("{}file {size} bytes", a.report());
    assert_eq!(size, a.expected_bytes(), "the estimate is the file's size");
    assert!(size <= tight_budget);
    assert!(a.expert_bytes < full.expert_bytes);
    assert!(a.loss > full.loss);
    // The layout stays llama.cpp's, one type per stacked tensor, as chosen.
    let file = GgufFile::open(&path).unwrap();
    let model = Model::load(&file).expect("loads");
    let mut types_seen = std::collections::HashSet::new();
    let mut layer_bits = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        let Ffn::Moe(moe) = &layer.ffn else { panic!() };
        for (m, t) in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
            .iter()
            .enumerate()
        {
            let info = file
                .header()
                .tensor(&format!("blk.{l}.{t}.weight"))
                .expect("stacked");
            assert_eq!(info.ty, a.types[l][0][m], "layer {l} {t}");
            types_seen.insert(info.ty);
            let slabs = match m {
                0 => &moe.experts.gate,
                1 => &moe.experts.up,
                _ => &moe.experts.down,
            };
            assert!(slabs.slabs.iter().all(|s| s.ty == info.ty));
        }
        let kl: f64 = (0..8).map(|e| stats.drop_kl[stats.idx(l, e)] as f64).sum();
        let b: f64 = a.types[l][0].iter().map(|&t| bits(t)).sum();
        layer_bits.push((kl, b));
    }
    assert!(
        types_seen.len() > 1,
        "a tight budget mixes types: {types_seen:?}"
    );
    // The layer whose experts cost most to remove is not stored with fewer bits than the layer
    // whose experts cost least.
    layer_bits.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert!(
        layer_bits.last().unwrap().1 >= layer_bits[0].1,
        "{layer_bits:?}"
    );
    // Too small a budget is refused with what the file needs.
    let opts = ConvertOptions {
        tuning: Some(Tuning {
            calib: Some(calib_text()),
            target: Some((Target::Bytes(a.fixed_bytes), Granularity::PerExpert)),
            ..Default::default()
        }),
        ..ConvertOptions::new(GgmlType::Q8_0)
    };
    let small = dir.path().join("small.gguf");
    let Err(e) = convert(&fx.dir, &small, &opts, &|_, _, _| {}) else {
        panic!("a budget below the non-expert tensors' bytes was accepted");
    };
    assert!(
        e.to_string().contains("--target-size") && e.to_string().contains("MiB"),
        "{e}"
    );
    assert!(!dir.path().join("small.gguf").exists());

    // A cap on the types keeps every expert matrix at or below it, whatever the budget.
    let capped = {
        let path = dir.path().join("capped.gguf");
        let opts = ConvertOptions {
            tuning: Some(Tuning {
                calib: Some(calib_text()),
                target: Some((Target::Bytes(u64::MAX / 2), Granularity::Stacked)),
                max_expert_type: Some(GgmlType::Q5K),
                ..Default::default()
            }),
            ..ConvertOptions::new(GgmlType::Q8_0)
        };
        let s = convert(&fx.dir, &path, &opts, &|_, _, _| {}).unwrap();
        s.tuned.unwrap().allocation.unwrap()
    };
    // Q5_K falls back to Q5_0 on the fixture's 64- and 32-value rows.
    for t in capped.types.iter().flatten().flatten() {
        assert!(bits(*t) <= bits(GgmlType::Q5_0), "{t}");
    }
    assert!(capped.expert_bytes < full.expert_bytes);

    // Per-expert: each expert matrix has the chosen type and is its round trip.
    let (path, a, _) = run("per-expert.gguf", u64::MAX / 2, Granularity::PerExpert);
    let file = GgufFile::open(&path).unwrap();
    let model = Model::load(&file).expect("per-expert file loads");
    let src_conv = fx.convert(GgmlType::F32);
    let src = src_conv.open();
    for (l, layer) in model.layers.iter().enumerate() {
        let Ffn::Moe(moe) = &layer.ffn else { panic!() };
        for (m, (t, slabs)) in [
            ("ffn_gate_exps", &moe.experts.gate),
            ("ffn_up_exps", &moe.experts.up),
            ("ffn_down_exps", &moe.experts.down),
        ]
        .into_iter()
        .enumerate()
        {
            let info = src.header().tensor(&format!("blk.{l}.{t}.weight")).unwrap();
            let values = f32s(src.tensor_bytes(info));
            let per = values.len() / 8;
            for e in 0..8 {
                let ty = a.types[l][e][m];
                assert_eq!(slabs.slabs[e].ty, ty);
                let q = moe_runtime::tensor::quant::quantize(ty, &values[e * per..(e + 1) * per]);
                assert_eq!(slabs.slabs[e].data, &q[..], "layer {l} {t} expert {e}");
            }
        }
    }
}

/// Writes `file` with every tensor as f32 and per-expert tensors stacked again.
fn dequantize_file(file: &GgufFile, out: &Path) {
    let h = file.header();
    let meta: Vec<_> = h
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.alignment" && k != calib::KEY_LAYOUT)
        .cloned()
        .collect();
    let mut decls = Vec::new();
    let mut data: Vec<Vec<f32>> = Vec::new();
    let decode = |t: &moe_runtime::gguf::TensorInfo| {
        let mut v = vec![0f32; t.n_elements()];
        moe_runtime::tensor::quant::dequantize(t.ty, file.tensor_bytes(t), &mut v);
        v
    };
    for t in h.tensors() {
        let stem = t.name.strip_suffix(".0.weight");
        if let Some(stem) = stem.filter(|s| s.ends_with("_exps")) {
            let mut all = Vec::new();
            let mut e = 0;
            while let Some(x) = h.tensor(&calib::per_expert_name(stem, e)) {
                all.extend(decode(x));
                e += 1;
            }
            decls.push(TensorDecl {
                name: format!("{stem}.weight"),
                dims: vec![t.dims[0], t.dims[1], e],
                ty: GgmlType::F32,
            });
            data.push(all);
        } else if t.name.contains("_exps.") {
            continue;
        } else {
            decls.push(TensorDecl {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: GgmlType::F32,
            });
            data.push(decode(t));
        }
    }
    let f = std::fs::File::create(out).unwrap();
    let mut w = GgufWriter::begin(f, &meta, decls, 4096).unwrap();
    for d in data {
        let bytes: Vec<u8> = d.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_tensor_data(&bytes).unwrap();
    }
    w.finish().unwrap();
}

fn small_cache(model: &Model, path: &Path, slots: usize) -> Arc<ExpertCache> {
    expert_cache(
        model,
        path,
        CacheConfig {
            io_threads: 1,
            ..cache_config(slots, Eviction::Lru)
        },
    )
}

/// Logits of `ids` (prefill) then of 6 greedy steps.
fn session_logits(
    model: &Model,
    ids: &[u32],
    cache: Option<Arc<ExpertCache>>,
    opts: RouteOptions,
) -> Vec<f32> {
    let mut s = Session::with_kv_type(model, 256, KvType::F32);
    if let Some(c) = cache {
        s.set_streaming(ExpertStreaming {
            cache: Some(c),
            lookahead: 0,
        });
    }
    s.set_route_options(opts);
    let mut out = s.forward(ids, true).unwrap().to_vec();
    let vocab = model.hp.n_vocab;
    for _ in 0..6 {
        let next = moe_runtime::sampling::argmax_logits(&out[out.len() - vocab..]);
        out.extend_from_slice(s.forward(&[next], false).unwrap());
    }
    out
}

#[test]
fn lossy_options_are_off_by_default_and_change_nothing_when_off() {
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let ids = &fx.expected.prompts[2].ids;

    // A session that never heard of the options...
    let plain = {
        let mut s = Session::with_kv_type(&model, 256, KvType::F32);
        let mut out = s.forward(ids, true).unwrap().to_vec();
        let vocab = model.hp.n_vocab;
        for _ in 0..6 {
            let next = moe_runtime::sampling::argmax_logits(&out[out.len() - vocab..]);
            out.extend_from_slice(s.forward(&[next], false).unwrap());
        }
        out
    };
    // ...equals one given the default options, resident or streamed (bit for bit).
    assert!(RouteOptions::default().is_off());
    let off = session_logits(&model, ids, None, RouteOptions::default());
    assert_eq!(plain, off);
    let streamed = session_logits(
        &model,
        ids,
        Some(small_cache(&model, &conv.path, 2)),
        RouteOptions::default(),
    );
    assert_eq!(plain, streamed);

    // The command line leaves them off unless asked.
    let mut out = Vec::new();
    let mut err = Vec::new();
    let path = conv.path.to_str().unwrap().to_string();
    moe_runtime::cli::run(
        [
            "moe-run", "-m", &path, "--tokens", "5,6,7", "-n", "2", "--temp", "0", "--stats",
        ]
        .map(Into::into),
        &mut out,
        &mut err,
    )
    .unwrap();
    let err = String::from_utf8(err).unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(err.lines().last().unwrap()).expect("stats JSON");
    assert!(stats["lossy_routing"].is_null(), "{err}");

    // When on, they do act (so the comparisons above can fail): top-p 0.5 drops experts, and
    // skipping uncached experts with a 2-slot cache drops some too.
    let mut s = Session::with_kv_type(&model, 256, KvType::F32);
    s.set_route_options(RouteOptions {
        top_p: Some(0.5),
        skip_uncached_below: None,
    });
    let on = s.forward(ids, true).unwrap().to_vec();
    assert!(s.lossy_stats().dropped_top_p > 0);
    assert_ne!(on, plain[..on.len()]);
    let skipped = {
        let mut s = Session::with_kv_type(&model, 256, KvType::F32);
        s.set_streaming(ExpertStreaming {
            cache: Some(small_cache(&model, &conv.path, 2)),
            lookahead: 0,
        });
        s.set_route_options(RouteOptions {
            top_p: None,
            skip_uncached_below: Some(0.5),
        });
        for &t in ids {
            s.forward(&[t], false).unwrap();
        }
        s.lossy_stats().skipped_uncached
    };
    assert!(skipped > 0);
}

/// The cache reads a calibrated file's statistics: `--pin-hot` pins the most used experts
/// (and the run stays exact), and a file without statistics refuses `--pin-hot`.
#[test]
fn calibration_statistics_pin_hot_experts_without_changing_output() {
    let fx = Fixture::load("qwen3_moe");
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        calib: Some(calib_text()),
        ..Default::default()
    };
    let file = tuned(&fx, dir.path(), "calibrated.gguf", GgmlType::Q8_0, &tuning);
    drop(file);
    let path = dir.path().join("calibrated.gguf");
    let path = path.to_str().unwrap();
    let run = |extra: &[&str]| -> (String, serde_json::Value) {
        let mut argv = vec![
            "moe-run", "-m", path, "--tokens", "5,6,7,8", "-n", "6", "--temp", "0", "--ids",
            "--stats",
        ];
        argv.extend_from_slice(extra);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        moe_runtime::cli::run(argv.iter().map(Into::into), &mut out, &mut err)
            .unwrap_or_else(|e| panic!("{extra:?}: {e}"));
        let out = String::from_utf8(out).unwrap();
        let err = String::from_utf8(err).unwrap();
        let ids = out.lines().last().unwrap().to_string();
        (
            ids,
            serde_json::from_str(err.lines().last().unwrap()).unwrap(),
        )
    };
    let (resident, _) = run(&[]);
    // Slots are page-aligned, so the fixture's tiny experts take 24 KiB each: 200% of the expert
    // bytes is about half of the 24 experts.
    let (pinned, stats) = run(&["--expert-cache", "200%", "--pin-hot", "0.5"]);
    assert_eq!(resident, pinned);
    assert!(stats["pinned_slots"].as_u64().unwrap() > 0, "{stats}");
    let (prior_off, _) = run(&["--expert-cache", "200%", "--no-calib-prior"]);
    assert_eq!(resident, prior_off);

    let plain = fx.convert(GgmlType::Q8_0);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let e = moe_runtime::cli::run(
        [
            "moe-run",
            "-m",
            plain.path.to_str().unwrap(),
            "--tokens",
            "5",
            "-n",
            "1",
            "--expert-cache",
            "60%",
            "--pin-hot",
            "0.5",
        ]
        .map(Into::into),
        &mut out,
        &mut err,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--calib"), "{e}");
}

/// DeepSeek-V2 (group_limited_greedy) routes by expert groups: pruning one expert from every
/// group keeps the groups meaningful, and the pruned file computes exactly what the full model
/// computes with those experts masked out of its routers. A prune that would unbalance the
/// groups is refused. (The V3 fixture cannot be pruned at all: its groups hold two experts and
/// V3 scores a group by its best two.)
#[test]
fn pruning_a_grouped_router_keeps_groups_balanced() {
    let fx = Fixture::load("deepseek_v2");
    let dir = tempfile::tempdir().unwrap();
    // Fixture: 3 layers (the first dense), 8 experts in 4 groups of 2.
    let drop: Vec<(usize, usize)> = [1usize, 2]
        .iter()
        .flat_map(|&l| [0usize, 3, 4, 7].map(|e| (l, e)))
        .collect();
    let tuning = Tuning {
        prune: Some(drop_list(&drop)),
        ..Default::default()
    };
    let pruned = tuned(&fx, dir.path(), "pruned.gguf", GgmlType::F32, &tuning);
    let full_conv = fx.convert(GgmlType::F32);
    let full_file = full_conv.open();
    let full = Model::load(&full_file).unwrap();
    let hp = &full.hp;
    let mut mask = vec![false; hp.n_layer * hp.n_expert];
    for &(l, e) in &drop {
        mask[l * hp.n_expert + e] = true;
    }
    for case in &fx.expected.prompts {
        let got = prompt_logits(&pruned, &case.ids);
        let mut s = Session::with_kv_type(&full, 256, KvType::F32);
        s.set_expert_mask(Some(mask.clone())).unwrap();
        let want = s.forward(&case.ids, true).unwrap().to_vec();
        let diff = max_rel_diff(&got, &want, hp.n_vocab);
        assert!(diff < 1e-5, "pruned vs masked: {diff:e}");
    }

    let unbalanced = Tuning {
        prune: Some(PruneSpec::parse("drop:1:0,2:0").unwrap()),
        ..Default::default()
    };
    let opts = ConvertOptions {
        tuning: Some(unbalanced),
        ..ConvertOptions::new(GgmlType::F32)
    };
    let Err(err) = convert(&fx.dir, &dir.path().join("bad.gguf"), &opts, &|_, _, _| {}) else {
        panic!("an unbalanced prune of a grouped router is refused");
    };
    assert!(err.to_string().contains("every group"), "{err}");
}

#[test]
fn calibration_collects_an_importance_matrix_for_every_architecture() {
    let opts = CalibOptions {
        kl_tokens: 0,
        window: 32,
        ..calib_text()
    };
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::F32);
        let cal = moe_convert::calib::calibrate(&conv.path, &opts).unwrap();
        let im = cal
            .imatrix
            .unwrap_or_else(|| panic!("{name}: no importance matrix"));
        let file = conv.open();
        let h = file.header();
        let model = Model::load(&file).unwrap();
        let tokens = (im.chunk_count * im.chunk_size) as u64;
        let mut by_name = std::collections::HashMap::new();
        for e in &im.entries {
            let t = h
                .tensor(&e.name)
                .unwrap_or_else(|| panic!("{name}: `{}` is not in the file", e.name));
            // One row of sums per expert, or (MLA's per-head products, as llama-imatrix sums
            // a 3-D product) every head's side by side with one count.
            let n_mat = t.dims.get(2).copied().unwrap_or(1);
            let n_counts = e.sum.counts.len();
            assert!(
                e.sum.cols * n_counts == t.dims[0] * n_mat && (n_counts == 1 || n_counts == n_mat),
                "{name}: {} has {} x {n_counts} sums for dims {:?}",
                e.name,
                e.sum.cols,
                t.dims
            );
            assert!(e.sum.sums.iter().all(|v| v.is_finite() && *v >= 0.0));
            let total: u64 = e.sum.counts.iter().sum();
            // Every token passes each plain matrix once and `n_expert_used` experts.
            let per_token = if n_counts > 1 {
                model.hp.n_expert_used
            } else {
                1
            };
            assert_eq!(total, tokens * per_token as u64, "{name}: {}", e.name);
            by_name.insert(e.name.clone(), e);
        }
        for t in h.tensors() {
            let wanted =
                t.name.starts_with("blk.") && moe_convert::mix::quantizable(&t.name, &t.dims);
            assert!(
                !wanted || by_name.contains_key(&t.name),
                "{name}: the inputs of `{}` were not collected",
                t.name
            );
        }
    }
}
