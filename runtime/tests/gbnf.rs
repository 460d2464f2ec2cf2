//! llama.cpp's GBNF grammars, converted to Lark and run by llguidance, accept exactly the texts
//! llama.cpp's own matcher accepts: `fixtures/gbnf_cases.json` holds texts and llama.cpp's
//! verdicts (from `scripts/check/gbnf_llamacpp.py`) for llama.cpp's `grammars/*.gbnf` and for
//! grammars written to catch greedy lexing cutting text where GBNF would not.
//!
//! Each text is fed token by token twice: as single bytes (every character boundary is a
//! token boundary) and, when llama.cpp's vocabulary files are there, as llama.cpp tokenized it
//! for the verdict (ggml-vocab-llama-bpe.gguf). llama.cpp's grammar files and vocabularies are
//! fetched by `scripts/fixtures/fetch_llama_cpp_files.sh` into `tests/fixtures/grammars` and
//! `tests/fixtures/vocab` ($MOE_EDGE_GRAMMAR_DIR, $MOE_EDGE_VOCAB_DIR); without them only the
//! inline grammars run, unless `MOE_EDGE_REQUIRE_VOCAB=1`, when the test fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_runtime::gguf::GgufFile;
use moe_runtime::grammar::{Grammar, GrammarVocab};
use moe_runtime::tokenizer::Tokenizer;
use serde_json::Value;

fn dir(var: &str, default: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(default),
    }
}

fn required() -> bool {
    std::env::var("MOE_EDGE_REQUIRE_VOCAB").is_ok_and(|v| v == "1")
}

/// `text` as pieces of text and `<[N]>` token ids.
fn pieces(text: &str) -> Vec<Result<&str, u32>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("<[") {
        let end = at + rest[at..].find("]>").expect("closed token");
        if at > 0 {
            out.push(Ok(&rest[..at]));
        }
        out.push(Err(rest[at + 2..end].parse().expect("token id")));
        rest = &rest[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Ok(rest));
    }
    out
}

/// Whether every token is allowed and the grammar may end after them.
fn accepts(vocab: &Arc<GrammarVocab>, gbnf: &str, ids: &[u32]) -> bool {
    let c = vocab
        .compile(&Grammar::Gbnf(gbnf.to_string()))
        .unwrap_or_else(|e| panic!("{e}\n{gbnf}"));
    let mut s = c.start();
    for &id in ids {
        if !s.allows(id).unwrap() {
            return false;
        }
        s.accept(id).unwrap();
    }
    s.is_accepting().unwrap()
}

#[test]
fn converted_gbnf_accepts_what_llama_cpp_accepts() {
    let cases: Value = serde_json::from_str(include_str!("fixtures/gbnf_cases.json")).unwrap();
    let grammars = dir("MOE_EDGE_GRAMMAR_DIR", "../tests/fixtures/grammars");
    let bpe_path =
        dir("MOE_EDGE_VOCAB_DIR", "../tests/fixtures/vocab").join("ggml-vocab-llama-bpe.gguf");

    // Every byte one token; ids are bytes (so `<[10]>` is the newline token).
    let bytes = Arc::new(
        GrammarVocab::from_token_bytes((0..=255u8).map(|b| vec![b]).collect(), &[]).unwrap(),
    );
    let by_bytes = |text: &str| -> Vec<u32> {
        pieces(text)
            .into_iter()
            .flat_map(|p| match p {
                Ok(s) => s.bytes().map(u32::from).collect(),
                Err(id) => vec![id],
            })
            .collect()
    };
    let bpe = if bpe_path.exists() {
        let file = GgufFile::open(&bpe_path).unwrap();
        let tok = Tokenizer::from_gguf(file.header()).unwrap();
        let vocab = Arc::new(GrammarVocab::new(&tok, tok.vocab_size()).unwrap());
        Some((tok, vocab))
    } else {
        assert!(!required(), "{} is missing", bpe_path.display());
        eprintln!(
            "note: {} is missing; only the byte vocabulary runs",
            bpe_path.display()
        );
        None
    };

    let mut checked = 0;
    let mut wrong = Vec::new();
    for g in cases["grammars"].as_array().unwrap() {
        let (name, text) = match (g.get("file"), g.get("gbnf")) {
            (Some(file), _) => {
                let file = file.as_str().unwrap();
                let path = grammars.join(file);
                match std::fs::read_to_string(&path) {
                    Ok(t) => (file.to_string(), t),
                    Err(e) => {
                        assert!(!required(), "{}: {e}", path.display());
                        eprintln!("note: {} is missing: skipped", path.display());
                        continue;
                    }
                }
            }
            (_, Some(gbnf)) => (
                g["name"].as_str().unwrap().to_string(),
                gbnf.as_str().unwrap().to_string(),
            ),
            _ => panic!("a grammar needs `file` or `gbnf`"),
        };
        for case in g["cases"].as_array().unwrap() {
            let input = case["text"].as_str().unwrap();
            let want = case["accepted"].as_bool().expect("a verdict");
            let got = accepts(&bytes, &text, &by_bytes(input));
            if got != want {
                wrong.push(format!(
                    "{name}, bytes: {input:?}: llama.cpp {want}, moe-edge {got}"
                ));
            }
            if let Some((tok, vocab)) = &bpe {
                let ids: Vec<u32> = pieces(input)
                    .into_iter()
                    .flat_map(|p| match p {
                        Ok(s) => tok.encode(s, false).unwrap(),
                        Err(id) => vec![id],
                    })
                    .collect();
                let got = accepts(vocab, &text, &ids);
                if got != want {
                    wrong.push(format!("{name}, llama-bpe tokens {ids:?}: {input:?}: llama.cpp {want}, moe-edge {got}"));
                }
            }
            checked += 1;
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {checked} texts:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(checked >= 40, "only {checked} texts checked");
}
