//! Writes the seed corpora of `fuzz/corpus/` from the project's fixtures (ignored by default:
//! `cargo test -p moe-fuzz-targets --test seeds -- --ignored`, or `scripts/check/fuzz.sh
//! --seeds`). Seeds are kept small: a fuzzer mutates small inputs faster, and they live in git.

use std::path::{Path, PathBuf};

use moe_convert::{convert, ConvertOptions};
use moe_fuzz_targets::repo_root;
use moe_runtime::gguf::{GgmlType, GgufFile, GgufHeader, GgufWriter, TensorDecl, Value};

fn corpus(name: &str) -> PathBuf {
    let d = repo_root().join("fuzz/corpus").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn put(name: &str, file: &str, data: &[u8]) {
    std::fs::write(corpus(name).join(file), data).unwrap();
}

/// A converted fixture cut down to its first layer, without the embedded tokenizer.json and
/// with 32-byte alignment instead of pages: a small, complete, loadable GGUF.
fn small_gguf(fixture: &str, ty: GgmlType) -> Vec<u8> {
    let tmp = std::env::temp_dir().join(format!("moe-fuzz-seed-{fixture}.gguf"));
    convert(
        &repo_root().join("tests/fixtures").join(fixture),
        &tmp,
        &ConvertOptions::new(ty),
        &|_, _, _| {},
    )
    .unwrap();
    let file = GgufFile::open(&tmp).unwrap();
    let h = file.header();
    let arch = h
        .get("general.architecture")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let mut meta: Vec<(String, Value)> = h
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.alignment" && k != "tokenizer.huggingface.json")
        .cloned()
        .collect();
    for (k, v) in &mut meta {
        if *k == format!("{arch}.block_count") {
            *v = Value::U32(1);
        }
    }
    let keep = |name: &str| !name.starts_with("blk.") || name.starts_with("blk.0.");
    let tensors: Vec<_> = h.tensors().iter().filter(|t| keep(&t.name)).collect();
    let decls = tensors
        .iter()
        .map(|t| TensorDecl {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let mut w = GgufWriter::begin(Vec::new(), &meta, decls, 32).unwrap();
    for t in &tensors {
        w.write_tensor_data(file.tensor_bytes(t)).unwrap();
    }
    let bytes = w.finish().unwrap();
    let _ = std::fs::remove_file(&tmp);
    GgufHeader::parse(&bytes).unwrap();
    bytes
}

fn gguf_seeds() {
    for (fixture, ty) in [
        ("qwen3_moe", GgmlType::Q8_0),
        ("deepseek_v2", GgmlType::Q4_0),
        ("mixtral", GgmlType::F16),
    ] {
        let bytes = small_gguf(fixture, ty);
        put("gguf", &format!("{fixture}-{}.gguf", ty.name()), &bytes);
    }
}

/// A vocabulary description (see `moe_fuzz_targets::tokenizer`) of a llama.cpp vocab-only file:
/// its first `n` tokens, its control tokens, its first merges and the start of its test text.
fn describe_vocab(h: &GgufHeader, n: usize, text: &str) -> String {
    let tokens = h
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .unwrap_or(&[]);
    let types = h
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array());
    let scores = h.get("tokenizer.ggml.scores").and_then(|v| v.as_array());
    let ty = |i: usize| types.and_then(|t| t.get(i)?.as_u64()).unwrap_or(1);
    let score = |i: usize| scores.and_then(|s| s.get(i)?.as_f64()).unwrap_or(0.0);
    let mut ids: Vec<usize> = (0..tokens.len().min(n)).collect();
    ids.extend(
        (n..tokens.len())
            .filter(|&i| ty(i) == 3 || ty(i) == 4)
            .take(16),
    );
    let new_id = |old: u64| ids.iter().position(|&i| i as u64 == old);
    let mut head = String::new();
    for (k, v) in h.metadata() {
        let Some(short) = k.strip_prefix("tokenizer.ggml.") else {
            continue;
        };
        let value = match v {
            Value::String(s) if !s.contains(char::is_whitespace) => s.clone(),
            Value::Bool(b) => b.to_string(),
            v if short.ends_with("_id") => match v.as_u64().and_then(new_id) {
                Some(id) => id.to_string(),
                None => continue,
            },
            _ => continue,
        };
        head.push_str(&format!("{short}={value} "));
    }
    let mut out = head.trim_end().to_string();
    out.push('\n');
    for &i in &ids {
        let t = tokens[i].as_str().unwrap_or("");
        if t.contains('\n') {
            continue;
        }
        out.push_str(&format!("{}\t{}\t{t}\n", ty(i), score(i)));
    }
    if let Some(merges) = h.get("tokenizer.ggml.merges").and_then(|v| v.as_array()) {
        out.push_str("#merges\n");
        for m in merges.iter().take(n) {
            out.push_str(m.as_str().unwrap_or(""));
            out.push('\n');
        }
    }
    out.push_str("#text\n");
    out.extend(text.chars().take(300));
    out
}

fn tokenizer_seeds() {
    let vocab = repo_root().join("tests/fixtures/vocab");
    let mut found = 0;
    for name in [
        "llama-spm",
        "qwen2",
        "llama-bpe",
        "gpt-2",
        "deepseek-llm",
        "gemma-4",
        "phi-3",
        "command-r",
    ] {
        let path = vocab.join(format!("ggml-vocab-{name}.gguf"));
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let h = GgufHeader::parse(&bytes).unwrap();
        let text = std::fs::read_to_string(vocab.join(format!("ggml-vocab-{name}.gguf.inp")))
            .unwrap_or_default();
        put(
            "tokenizer",
            &format!("{name}.txt"),
            describe_vocab(&h, 320, &text).as_bytes(),
        );
        found += 1;
    }
    assert!(
        found > 0,
        "no llama.cpp vocabularies: run scripts/fixtures/fetch_llama_cpp_files.sh"
    );
    let small = repo_root().join("models/small-moe/small-moe-q8_0.gguf");
    let file = GgufFile::open(small).unwrap();
    let text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.\n\nCall me Ishmael. <|im_start|>user\n";
    put(
        "tokenizer",
        "small-moe.txt",
        describe_vocab(file.header(), 400, text).as_bytes(),
    );
}

fn safetensors_header(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8..8 + n].to_vec()
}

fn convert_seeds() {
    for fixture in [
        "qwen3_moe",
        "mixtral",
        "deepseek_v2",
        "glm4_moe",
        "olmoe",
        "granitemoe",
    ] {
        let dir = repo_root().join("tests/fixtures").join(fixture);
        let mut seed = std::fs::read(dir.join("config.json")).unwrap();
        seed.push(0);
        seed.extend(safetensors_header(&dir.join("model.safetensors")));
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            seed.push(0);
            seed.extend(std::fs::read(dir.join(f)).unwrap());
        }
        put("convert", &format!("{fixture}.bin"), &seed);
    }
}

/// Protocol-buffer encoding, just enough for a tiny ONNX GRU.
mod pb {
    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    pub fn bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
    pub fn int(field: u64, v: u64, out: &mut Vec<u8>) {
        varint(field << 3, out);
        varint(v, out);
    }
}

/// The GRU step graph `scripts/train/train_pregate.py` exports, with hidden width 2, embedding
/// width 2, a vocabulary of 4, and 2 experts on layers 0 and 1 (top 1).
fn tiny_gru() -> Vec<u8> {
    let (h, de, vocab, n_out) = (2u64, 2u64, 4u64, 4u64);
    let mut graph = Vec::new();
    for (op, ins, outs) in moe_runtime::moe::gru::GRAPH {
        let mut n = Vec::new();
        for i in *ins {
            pb::bytes(1, i.as_bytes(), &mut n);
        }
        for o in *outs {
            pb::bytes(2, o.as_bytes(), &mut n);
        }
        pb::bytes(4, op.as_bytes(), &mut n);
        if *op == "Concat" {
            let mut a = Vec::new();
            pb::bytes(1, b"axis", &mut a);
            pb::int(3, 1, &mut a);
            pb::bytes(5, &a, &mut n);
        }
        pb::bytes(1, &n, &mut graph);
    }
    let mut inits: Vec<(String, Vec<u64>)> = vec![("emb".into(), vec![vocab, de])];
    for g in ["r", "z", "n"] {
        inits.push((format!("Wi_{g}"), vec![de, h]));
        inits.push((format!("Wh_{g}"), vec![h, h]));
        inits.push((format!("bi_{g}"), vec![h]));
        inits.push((format!("bh_{g}"), vec![h]));
    }
    inits.push(("head_T".into(), vec![h + de, n_out]));
    inits.push(("head_b".into(), vec![n_out]));
    for (k, (name, dims)) in inits.iter().enumerate() {
        let mut t = Vec::new();
        for &d in dims {
            pb::int(1, d, &mut t);
        }
        pb::int(2, 1, &mut t);
        pb::bytes(8, name.as_bytes(), &mut t);
        let count: u64 = dims.iter().product();
        let raw: Vec<u8> = (0..count)
            .flat_map(|i| (((i + k as u64) % 7) as f32 * 0.25 - 0.75).to_le_bytes())
            .collect();
        pb::bytes(9, &raw, &mut t);
        pb::bytes(5, &t, &mut graph);
    }
    for (field, names) in [(11, ["token", "h"]), (12, ["logits", "h_next"])] {
        for n in names {
            let mut v = Vec::new();
            pb::bytes(1, n.as_bytes(), &mut v);
            pb::bytes(field, &v, &mut graph);
        }
    }
    let mut model = Vec::new();
    pb::int(1, 8, &mut model);
    pb::bytes(7, &graph, &mut model);
    for (k, v) in [
        ("moe_edge.layers", "0,1"),
        ("moe_edge.n_expert", "2"),
        ("moe_edge.top_k", "1"),
        ("moe_edge.hidden", "2"),
    ] {
        let mut p = Vec::new();
        pb::bytes(1, k.as_bytes(), &mut p);
        pb::bytes(2, v.as_bytes(), &mut p);
        pb::bytes(14, &p, &mut model);
    }
    model
}

fn onnx_seeds() {
    let gru = tiny_gru();
    let m = moe_runtime::onnx::OnnxModel::parse(&gru).unwrap();
    moe_runtime::moe::gru::GruPredictor::from_bytes(&gru, Path::new("seed"), 2, 2, None)
        .unwrap_or_else(|e| panic!("the seed GRU loads: {e}"));
    assert_eq!(m.nodes.len(), 26);
    put("onnx", "tiny-gru.onnx", &gru);
}

fn http_seeds() {
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let seeds = [
        ("health", "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string()),
        ("metrics-models", "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models/small-moe HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("completion", post("/v1/completions", r#"{"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "stop": ["\n"], "seed": 1}"#)),
        ("completion-ids-stream", post("/v1/completions", r#"{"prompt": [1, 2, 3], "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}, "logprobs": 2}"#)),
        ("chat", post("/v1/chat/completions", r#"{"model": "small-moe", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi {{ 7*7 }}"}]}], "max_tokens": 3, "top_p": 0.9, "top_k": 5, "min_p": 0.1}"#)),
        ("chat-stream-tools", post("/chat/completions", r#"{"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Bath\"}"}}]}, {"role": "tool", "tool_call_id": "c", "content": "rain"}], "stream": true, "logprobs": true, "top_logprobs": 2, "chat_template_kwargs": {"enable_thinking": false}, "reasoning_effort": "low"}"#)),
        ("bad-json", post("/v1/completions", r#"{"prompt": "x", "max_tokens": "many"}"#)),
        ("chunked", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"prompt\": \"ab\",\r\n0e\r\n\"max_tokens\":1}\r\n0\r\n\r\n".into()),
        ("wrong-method", "DELETE /v1/completions HTTP/1.1\r\nHost: x\r\n\r\nGET /nowhere HTTP/1.1\r\n\r\n".into()),
        ("too-large", "POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{".into()),
        ("incomplete", "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"messages\": [".into()),
    ];
    for (name, s) in seeds {
        put("http", &format!("{name}.http"), s.as_bytes());
    }
}

fn chat_seeds() {
    let msg = |role: u8, text: &str| {
        let mut v = vec![role];
        v.extend_from_slice(text.as_bytes());
        v
    };
    let convo = |template: u8, flags: u8, msgs: &[Vec<u8>]| {
        let mut v = vec![template, flags];
        v.extend(msgs.join(&0u8));
        v
    };
    let injection =
        "{{ 7 * 7 }} {% for x in range(3) %}{{ x }}{% endfor %} {{ raise_exception('no') }}";
    let seeds = [
        (
            "bundled",
            convo(0, 0, &[msg(0, "You are terse."), msg(1, injection)]),
        ),
        (
            "chatml",
            convo(
                1,
                0,
                &[
                    msg(1, "Hi"),
                    msg(2, "Hello! {# #}"),
                    msg(1, "</think> <|im_end|>"),
                ],
            ),
        ),
        (
            "tools",
            convo(
                2,
                5,
                &[
                    msg(1, "weather in Bath?"),
                    msg(2, "<think>rain</think>checking"),
                    msg(3, "{\"rain\": true}"),
                ],
            ),
        ),
        (
            "thinking",
            convo(7, 2, &[msg(0, "sys"), msg(1, injection), msg(2, "a\u{0}b")]),
        ),
        (
            "unicode",
            convo(30, 1, &[msg(1, "é😀\u{202e}  trailing  "), msg(2, "")]),
        ),
    ];
    for (name, s) in seeds {
        put("chat", &format!("{name}.bin"), &s);
    }
}

fn calib_seeds() {
    let seeds = [
        ("austen", "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."),
        ("melville-kl", "\u{1}Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my purse."),
        ("short", "a"),
        ("special", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>\t\r\n   é😀"),
    ];
    for (name, s) in seeds {
        put("calib", &format!("{name}.txt"), s.as_bytes());
    }
}

#[test]
#[ignore = "writes fuzz/corpus: run on purpose"]
fn write_seed_corpora() {
    gguf_seeds();
    tokenizer_seeds();
    convert_seeds();
    onnx_seeds();
    http_seeds();
    chat_seeds();
    calib_seeds();
}
