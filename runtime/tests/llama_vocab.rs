//! llama.cpp's own tokenizer test vectors (`models/ggml-vocab-*.gguf` with `.inp`/`.out`), run
//! as llama.cpp's `tests/test-tokenizer-0.cpp` runs them: every case of every vocabulary must give
//! exactly the expected ids.
//!
//! The vectors are fetched by `scripts/fixtures/fetch_llama_vocab.sh` (which `scripts/test.sh`
//! runs) into `tests/fixtures/vocab` or `$MOE_EDGE_VOCAB_DIR`. Without them the test prints a
//! note and passes, unless `MOE_EDGE_REQUIRE_VOCAB=1` (as in CI), when it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moe_runtime::gguf::GgufFile;
use moe_runtime::tokenizer::Tokenizer;

/// The vocabularies of the MoE families moe-edge runs (what each stands for: the fetch script).
/// Keep in step with VOCABS in scripts/fixtures/fetch_llama_vocab.sh.
const VOCABS: &[&str] = &[
    "llama-spm",
    "phi-3",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "deepseek-llm",
    "deepseek-coder",
    "gpt-2",
    "starcoder",
    "refact",
    "mpt",
    "command-r",
    "falcon",
    "gemma-4",
];

fn vocab_dir() -> PathBuf {
    match std::env::var_os("MOE_EDGE_VOCAB_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vocab"),
    }
}

/// `read_tests` of test-tokenizer-0.cpp: texts separated by a marker line, one line of
/// space-separated ids per text; a repeated text counts once (llama.cpp keeps them in a map).
fn read_cases(gguf: &Path) -> BTreeMap<String, Vec<u32>> {
    let with = |ext: &str| {
        let mut p = gguf.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let inp = std::fs::read_to_string(with(".inp")).expect("reading .inp");
    let out = std::fs::read_to_string(with(".out")).expect("reading .out");
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(SEP) {
            Some(at) => {
                texts.push(&inp[pos..pos + at]);
                pos += at + SEP.len();
            }
            None => {
                texts.push(&inp[pos..]);
                break;
            }
        }
    }
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        texts.len(),
        lines.len(),
        "{}: .inp and .out have different numbers of cases",
        gguf.display()
    );
    texts
        .into_iter()
        .zip(lines)
        .map(|(text, line)| {
            let ids = line
                .split_whitespace()
                .map(|t| t.parse().expect("token id"))
                .collect();
            (text.to_string(), ids)
        })
        .collect()
}

#[test]
fn llama_cpp_tokenizer_vectors() {
    let dir = vocab_dir();
    let required = std::env::var("MOE_EDGE_REQUIRE_VOCAB").as_deref() == Ok("1");
    let missing: Vec<&str> = VOCABS
        .iter()
        .copied()
        .filter(|v| !dir.join(format!("ggml-vocab-{v}.gguf.out")).exists())
        .collect();
    if !missing.is_empty() {
        let note = format!(
            "llama.cpp's tokenizer vectors {missing:?} are not in {}: run \
             scripts/fixtures/fetch_llama_vocab.sh",
            dir.display()
        );
        assert!(!required, "{note} (MOE_EDGE_REQUIRE_VOCAB=1)");
        eprintln!("note: skipping: {note}");
        return;
    }

    let mut failures = Vec::new();
    for name in VOCABS {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let tok = Tokenizer::from_gguf(file.header()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ggml = tok
            .ggml()
            .unwrap_or_else(|| panic!("{name}: expected the tokenizer.ggml.* tokenizer"));
        let cases = read_cases(&path);
        let mut passed = 0;
        for (text, want) in &cases {
            // test-tokenizer-0: add_special = false, parse_special = false.
            let got = ggml
                .encode(text, false, false)
                .unwrap_or_else(|e| panic!("{name}: {text:?}: {e}"));
            if &got == want {
                passed += 1;
            } else {
                let show = |ids: &[u32]| -> Vec<String> {
                    ids.iter()
                        .map(|&id| format!("{id} {:?}", ggml.token_text(id).unwrap_or("?")))
                        .collect()
                };
                failures.push(format!(
                    "{name}: {text:?}\n  expected {:?}\n  got      {:?}",
                    show(want),
                    show(&got)
                ));
            }
        }
        println!("{name}: {passed}/{} cases", cases.len());
    }
    assert!(
        failures.is_empty(),
        "{} cases differ from llama.cpp's:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
