//! The moe-run command line, driven in-process.

use std::ffi::OsString;

use moe_e2e::{max_rel_diff, prompt_logits, Fixture};
use moe_runtime::gguf::GgmlType;
use moe_runtime::model::{Model, DEFAULT_MAX_BATCH};
use moe_runtime::moe::cache::RUNTIME_OVERHEAD;

fn run(args: &[&str]) -> Result<(String, String), String> {
    let argv: Vec<OsString> = std::iter::once("moe-run")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    match moe_runtime::cli::run(argv, &mut out, &mut err) {
        Ok(()) => Ok((
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn dump_logits_writes_every_prompt_position() {
    let fx = Fixture::load("olmoe");
    let conv = fx.convert(GgmlType::F32);
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("logits.npy");
    let case = &fx.expected.prompts[1];
    run(&[
        "-m",
        conv.path.to_str().unwrap(),
        "--tokens",
        &ids_arg(&case.ids),
        "-n",
        "0",
        "--dump-logits",
        npy.to_str().unwrap(),
        "--kv-type",
        "f32",
    ])
    .unwrap();
    let (got, rows, vocab) =
        moe_runtime::npy::read_f32_2d(std::fs::File::open(&npy).unwrap()).unwrap();
    let (want, n, v) = fx.logits(1);
    assert_eq!((rows, vocab), (n, v));
    assert!(max_rel_diff(&got, &want, vocab) < 1e-4);
}

#[test]
fn greedy_ids_and_text() {
    let fx = Fixture::load("qwen2_moe");
    let conv = fx.convert(GgmlType::F32);
    let model = conv.path.to_str().unwrap();
    let case = &fx.expected.prompts[2];
    let (out, err) = run(&[
        "-m",
        model,
        "--tokens",
        &ids_arg(&case.ids),
        "-n",
        "16",
        "--temp",
        "0",
        "--ids",
        "--ignore-eos",
        "--kv-type",
        "f32",
    ])
    .unwrap();
    let last = out.lines().last().unwrap();
    let ids: Vec<u32> = serde_json::from_str(last).unwrap();
    assert_eq!(ids, case.greedy_ids);
    assert!(err.contains("generation: 16 tokens"), "{err}");

    // Text in, text out: the prompt is echoed and followed by the continuation.
    let (out, _) = run(&["-m", model, "-p", &case.text, "-n", "4", "--temp", "0"]).unwrap();
    assert!(out.starts_with(&case.text), "{out}");
    assert!(out.len() > case.text.len());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let model = conv.path.to_str().unwrap();
    let sample = |seed: &str| {
        let (out, _) = run(&[
            "-m",
            model,
            "-p",
            "The",
            "-n",
            "24",
            "--temp",
            "1.5",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
            "--seed",
            seed,
            "--ids",
            "--ignore-eos",
        ])
        .unwrap();
        out.lines().last().unwrap().to_string()
    };
    assert_eq!(sample("42"), sample("42"));
    assert_ne!(sample("42"), sample("43"));
}

#[test]
fn bad_invocations_are_explained() {
    let e = run(&["-m", "/nonexistent/model.gguf", "-p", "hi"]).unwrap_err();
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let e = run(&[
        "-m",
        conv.path.to_str().unwrap(),
        "--tokens",
        "99999",
        "-n",
        "1",
    ])
    .unwrap_err();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

/// A board profile's memory budget streams experts only when the model does not fit in it,
/// the output stays the resident one, and explicit flags win over the profile's defaults.
#[test]
fn board_profile_budget_streams_only_when_the_model_does_not_fit() {
    let fx = Fixture::load("qwen2_moe");
    let conv = fx.convert(GgmlType::F32);
    let model = conv.path.to_str().unwrap();
    let file_bytes = std::fs::metadata(&conv.path).unwrap().len();
    let case = &fx.expected.prompts[2];
    let ids = ids_arg(&case.ids);
    let dir = tempfile::tempdir().unwrap();
    // The generic profile with a budget of `bytes`, on a microSD card (one I/O thread).
    let profile = |bytes: u64| {
        let path = dir.path().join(format!("b{bytes}.toml"));
        let text = format!(
            "{}\n[defaults]\nmem_budget = \"{bytes}\"\n",
            include_str!("../targets/profiles/generic-aarch64.toml")
        );
        std::fs::write(&path, text).unwrap();
        format!("{}:microsd", path.display())
    };
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "-m",
            model,
            "--tokens",
            &ids,
            "-n",
            "8",
            "--temp",
            "0",
            "--ids",
            "--ignore-eos",
            "-c",
            "32",
        ];
        args.extend_from_slice(extra);
        let (out, err) = run(&args).unwrap();
        let ids: Vec<u32> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        (ids, err.lines().next().unwrap_or_default().to_string())
    };

    let (resident, line) = gen(&["--target-profile", "none"]);
    assert!(
        line.contains("profile: none") && line.contains("expert cache: off"),
        "{line}"
    );
    assert!(
        line.starts_with("cpu: ") && line.contains("kernels: "),
        "{line}"
    );

    // The runtime overhead and a prompt batch's scratch, which the budget plans for, on top of
    // the file: the KV cache does not fit.
    let file = conv.open();
    let scratch = Model::load(&file)
        .unwrap()
        .batch_scratch_bytes(DEFAULT_MAX_BATCH);
    let tight = profile(file_bytes + (RUNTIME_OVERHEAD + scratch) as u64);
    let (streamed, line) = gen(&["--target-profile", &tight]);
    assert!(
        line.contains("expert cache: ") && line.contains(" slots"),
        "{line}"
    );
    assert!(line.contains("belady, O_DIRECT, 1 I/O thread"), "{line}");
    assert_eq!(streamed, resident);

    let (_, line) = gen(&[
        "--target-profile",
        &tight,
        "--eviction",
        "lru",
        "--io-threads",
        "3",
    ]);
    assert!(line.contains("lru, O_DIRECT, 3 I/O threads"), "{line}");

    let roomy = profile(file_bytes + (64 << 20));
    let (_, line) = gen(&["--target-profile", &roomy]);
    assert!(line.contains("expert cache: off"), "{line}");
}

/// A copy of `src` with its metadata passed through `edit` (None drops a key; the tensors
/// unchanged).
fn with_metadata(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl Fn(&str, &moe_runtime::gguf::Value) -> Option<moe_runtime::gguf::Value>,
) {
    use moe_runtime::gguf::{GgufFile, GgufWriter, TensorDecl};
    let file = GgufFile::open(src).unwrap();
    let h = file.header();
    let meta: Vec<_> = h
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .filter_map(|(k, v)| edit(k, v).map(|v| (k.clone(), v)))
        .collect();
    let decls = h
        .tensors()
        .iter()
        .map(|t| TensorDecl {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let out = std::fs::File::create(dst).unwrap();
    let mut w = GgufWriter::begin(out, &meta, decls, h.alignment as u32).unwrap();
    for t in h.tensors() {
        w.write_tensor_data(file.tensor_bytes(t)).unwrap();
    }
    w.finish().unwrap();
}

/// A copy of `src` whose tokenizer is only `tokenizer.ggml.*` with `tokenizer.ggml.model` set to
/// `model`, as a llama.cpp conversion of a model with that tokenizer would be.
fn with_ggml_tokenizer_model(src: &std::path::Path, dst: &std::path::Path, model: &str) {
    use moe_runtime::gguf::Value;
    with_metadata(src, dst, |k, v| match k {
        "tokenizer.huggingface.json" => None,
        "tokenizer.ggml.model" => Some(Value::String(model.into())),
        _ => Some(v.clone()),
    });
}

/// A tokenizer moe-edge does not implement: a text prompt is refused with what to do instead,
/// and a prompt given as ids still runs, printing ids.
#[test]
fn unsupported_tokenizer_is_explained() {
    let fx = Fixture::load("olmoe");
    let conv = fx.convert(GgmlType::Q8_0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t5-tokenizer.gguf");
    with_ggml_tokenizer_model(&conv.path, &path, "t5");
    let model = path.to_str().unwrap();

    let e = run(&["-m", model, "-p", "Hello", "-n", "1"]).unwrap_err();
    assert!(
        e.contains("tokenizer.ggml.model = t5") && e.contains("Unigram") && e.contains("--tokens"),
        "{e}"
    );

    let case = &fx.expected.prompts[0];
    let (out, err) = run(&["-m", model, "--tokens", &ids_arg(&case.ids), "-n", "2"]).unwrap();
    assert!(err.contains("printed as ids"), "{err}");
    let ids: Vec<u32> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(ids.len(), 2);
}

/// `bytes` (a GGUF file) with the ggml type id of tensor `name` replaced by `id`.
fn with_tensor_type(mut bytes: Vec<u8>, name: &str, id: u32) -> Vec<u8> {
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .expect("tensor name in the header")
        + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty_at = at + 4 + 8 * n_dims;
    bytes[ty_at..ty_at + 4].copy_from_slice(&id.to_le_bytes());
    bytes
}

/// Files moe-run cannot run at all (a block format it does not read, an architecture it does not
/// know, a dense model, a tokenizer it does not have) are refused with what is wrong and what to
/// do, by every command that opens them.
#[test]
fn what_moe_run_cannot_run_is_explained() {
    use moe_runtime::gguf::Value;
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "It is a truth universally acknowledged.").unwrap();
    let text = text.to_str().unwrap();
    let commands = |model: &str| {
        [
            run(&["-m", model, "-p", "Hello", "-n", "1"]),
            run(&["bench", "-m", model, "-p", "4", "-n", "2", "-r", "1"]),
            run(&["eval", "-m", model, "--text", text]),
        ]
        .map(|r| r.expect_err("refused"))
    };

    // Block formats: one ggml knows but moe-run does not read, and an id ggml does not define.
    let bytes = std::fs::read(&conv.path).unwrap();
    for (id, named) in [(3, "Q4_1"), (34, "TQ1_0"), (99, "ggml type id 99")] {
        let path = dir.path().join(format!("type-{id}.gguf"));
        std::fs::write(
            &path,
            with_tensor_type(bytes.clone(), "blk.0.ffn_down_exps.weight", id),
        )
        .unwrap();
        for e in commands(path.to_str().unwrap()) {
            assert!(
                e.contains("blk.0.ffn_down_exps.weight")
                    && e.contains(named)
                    && e.contains("moe-run reads F32, F16, Q4_0")
                    && e.contains("llama-quantize")
                    && e.contains("moe-convert")
                    && e.matches("moe-run reads").count() == 1,
                "{e}"
            );
        }
    }

    // An architecture moe-run does not know.
    let path = dir.path().join("bert.gguf");
    with_metadata(&conv.path, &path, |k, v| match k {
        "general.architecture" => Some(Value::String("bert".into())),
        _ => Some(v.clone()),
    });
    for e in commands(path.to_str().unwrap()) {
        assert!(
            e.contains("`bert`") && e.contains("qwen3moe, olmoe") && e.contains("llama.cpp"),
            "{e}"
        );
    }

    // A model of a known architecture without experts.
    let path = dir.path().join("dense.gguf");
    with_metadata(&conv.path, &path, |k, v| {
        (k != "qwen3moe.expert_count").then(|| v.clone())
    });
    for e in commands(path.to_str().unwrap()) {
        assert!(
            e.contains("dense model") && e.contains("qwen3moe.expert_count is missing"),
            "{e}"
        );
    }

    // A tokenizer moe-run does not have: commands that read text say how to get one.
    let path = dir.path().join("wordpiece.gguf");
    with_ggml_tokenizer_model(&conv.path, &path, "bert");
    let model = path.to_str().unwrap();
    for (e, what) in [
        (
            run(&["eval", "-m", model, "--text", text]),
            "eval reads a text",
        ),
        (
            run(&[
                "bench", "-m", model, "-p", "4", "-n", "2", "-r", "1", "--text", text,
            ]),
            "or leave out --text",
        ),
    ] {
        let e = e.expect_err("refused");
        assert!(
            e.contains("WordPiece") && e.contains(what) && e.contains("moe-convert"),
            "{e}"
        );
    }
}

/// `eval --like-llama-perplexity` scores the tokens llama-perplexity scores: the text with its
/// special tokens, whole windows only, BOS first in every window (Mixtral's tokenizer adds one;
/// Qwen's does not), the second half of each window; the perplexity is that of the logits the
/// model gives each window.
#[test]
fn eval_scores_like_llama_perplexity() {
    use moe_runtime::tokenizer::Tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let text_path = dir.path().join("text.txt");
    let text = "It is a truth universally acknowledged, that a single man in possession of a \
                good fortune, must be in want of a wife. However little known the feelings or \
                views of such a man may be on his first entering a neighbourhood.\n";
    std::fs::write(&text_path, text).unwrap();
    for name in ["mixtral", "qwen3_moe"] {
        let conv = Fixture::load(name).convert(GgmlType::F32);
        let file = conv.open();
        let tok = Tokenizer::from_gguf(file.header()).unwrap();
        let window = 8;
        let (out, _) = run(&[
            "eval",
            "-m",
            conv.path.to_str().unwrap(),
            "--text",
            text_path.to_str().unwrap(),
            "--window",
            &window.to_string(),
            "--like-llama-perplexity",
        ])
        .unwrap();
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();

        let mut ids = tok.encode(text.trim_end_matches('\n'), true).unwrap();
        let adds_bos = name == "mixtral";
        assert_eq!(ids.first() == tok.bos().as_ref(), adds_bos, "{name}");
        ids.truncate(ids.len() / window * window);
        let (mut nll, mut scored) = (0f64, 0);
        for chunk in ids.chunks(window) {
            let mut chunk = chunk.to_vec();
            if adds_bos {
                chunk[0] = tok.bos().unwrap();
            }
            let logits = prompt_logits(&file, &chunk);
            let vocab = logits.len() / window;
            for i in window / 2..window - 1 {
                let row = &logits[i * vocab..(i + 1) * vocab];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                nll += lse - row[chunk[i + 1] as usize] as f64;
                scored += 1;
            }
        }
        assert_eq!(report["scored"], scored, "{name}");
        assert_eq!(report["tokens"], ids.len(), "{name}");
        let want = (nll / scored as f64).exp();
        let got = report["perplexity"].as_f64().unwrap();
        assert!((got / want - 1.0).abs() < 1e-5, "{name}: {got} vs {want}");
    }
}

/// `bench --gen-tokens random` decodes llama-bench's kind of input (a pseudo-random id at every
/// step) and reports the measured repetitions like the default.
#[test]
fn bench_can_feed_random_tokens_like_llama_bench() {
    let fx = Fixture::load("qwen3_moe");
    let conv = fx.convert(GgmlType::Q8_0);
    let model = conv.path.to_str().unwrap();
    let (out, _) = run(&[
        "bench",
        "-m",
        model,
        "-p",
        "0",
        "-n",
        "3",
        "-r",
        "2",
        "-t",
        "1",
        "--json",
        "--gen-tokens",
        "random",
    ])
    .unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tg = &report["tests"][0];
    assert_eq!(tg["test"], "tg", "{out}");
    assert_eq!(tg["samples"].as_array().unwrap().len(), 2, "{out}");
    let err = run(&["bench", "-m", model, "--gen-tokens", "sampled"]).unwrap_err();
    assert!(err.contains("greedy") && err.contains("random"), "{err}");
}
