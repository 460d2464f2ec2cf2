//! llama.cpp's own tokenizer test vectors (`models/ggml-vocab-*.gguf` with `.inp`/`.out`), run
//! as llama.cpp's `tests/test-tokenizer-0.cpp` runs them: every case of every vocabulary must give
//! exactly the expected ids.
//!
//! The vectors are fetched by `scripts/fixtures/fetch_llama_cpp_files.sh` (which `scripts/test.sh`
//! runs) into `tests/fixtures/vocab` or `$MOE_EDGE_VOCAB_DIR`. Without them the test prints a
//! note and passes, unless `MOE_EDGE_REQUIRE_VOCAB=1` (as in CI), when it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moe_runtime::gguf::GgufFile;
use moe_runtime::tokenizer::Tokenizer;

/// The vocabularies of the MoE families moe-edge runs (what each stands for: the fetch script).
/// Keep in step with VOCABS in scripts/fixtures/fetch_llama_cpp_files.sh.
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

/// The vocabulary folder when the vectors are there; `None` (after a note) when they are not
/// and not required.
fn vectors_dir() -> Option<PathBuf> {
    let dir = vocab_dir();
    let required = std::env::var("MOE_EDGE_REQUIRE_VOCAB").as_deref() == Ok("1");
    let missing: Vec<&str> = VOCABS
        .iter()
        .copied()
        .filter(|v| !dir.join(format!("ggml-vocab-{v}.gguf.out")).exists())
        .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    let note = format!(
        "llama.cpp's tokenizer vectors {missing:?} are not in {}: run \
         scripts/fixtures/fetch_llama_cpp_files.sh",
        dir.display()
    );
    assert!(!required, "{note} (MOE_EDGE_REQUIRE_VOCAB=1)");
    eprintln!("note: skipping: {note}");
    None
}

fn load(dir: &Path, name: &str) -> Tokenizer {
    let path = dir.join(format!("ggml-vocab-{name}.gguf"));
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let tok = Tokenizer::from_gguf(file.header()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        tok.ggml().is_some(),
        "{name}: expected the tokenizer.ggml.* tokenizer"
    );
    tok
}

#[test]
fn llama_cpp_tokenizer_vectors() {
    let Some(dir) = vectors_dir() else { return };
    let mut failures = Vec::new();
    for name in VOCABS {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let tok = load(&dir, name);
        let ggml = tok.ggml().expect("checked by load");
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

/// Decoding inverts encoding (llama.cpp's `detokenize`, as `Tokenizer::decode` runs it): exactly,
/// except where llama.cpp's clean-up of spaces before punctuation (on for most BPE
/// vocabularies) changes the text, so cases it would touch are left out for those.
#[test]
fn decoding_inverts_encoding() {
    let Some(dir) = vectors_dir() else { return };
    const NO_CLEAN_UP: &[&str] = &[
        "llama-spm",
        "phi-3",
        "qwen2",
        "qwen35",
        "deepseek-llm",
        "deepseek-coder",
        "command-r",
    ];
    for name in VOCABS {
        let tok = load(&dir, name);
        let cases = read_cases(&dir.join(format!("ggml-vocab-{name}.gguf")));
        let mut checked = 0;
        for (text, ids) in &cases {
            let touched = [" ?", " !", " .", " ,", " '"]
                .iter()
                .any(|p| text.contains(p));
            if touched && !NO_CLEAN_UP.contains(name) {
                continue;
            }
            assert_eq!(&tok.decode(ids, false).unwrap(), text, "{name}");
            checked += 1;
        }
        assert!(checked >= 40, "{name}: only {checked} cases checked");
    }
}

/// Special tokens as llama.cpp treats them (`tokenizer_st_partition`, `tokenize`, `detokenize`,
/// the end-of-generation set); expected ids come from the vectors' own tokenizations of the parts.
#[test]
fn special_tokens_bos_and_end_of_generation() {
    let Some(dir) = vectors_dir() else { return };
    let enc = |tok: &Tokenizer, text: &str, add_special, parse_special| {
        tok.ggml()
            .unwrap()
            .encode(text, add_special, parse_special)
            .unwrap()
    };
    let cat = |parts: &[&[u32]]| parts.concat();

    // Control tokens in the text are recognised only when asked (moe-run and the daemon ask).
    let qwen = load(&dir, "qwen2");
    let (start, end) = (151644, 151645);
    let body = enc(&qwen, "user\nHi", false, false);
    assert_eq!(
        enc(&qwen, "<|im_start|>user\nHi<|im_end|>", false, true),
        cat(&[&[start], &body, &[end]])
    );
    assert_eq!(
        qwen.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap(),
        cat(&[&[start], &body, &[end]]),
        "no BOS for Qwen2, special tokens parsed"
    );
    assert!(!enc(&qwen, "<|im_start|>", false, false).contains(&start));
    // User-defined tokens are split out even when special tokens are not parsed.
    assert_eq!(
        enc(&qwen, "a[PAD151646]b", false, false),
        cat(&[
            &enc(&qwen, "a", false, false),
            &[151646],
            &enc(&qwen, "b", false, false)
        ])
    );
    assert_eq!(
        qwen.decode(&cat(&[&[start], &body]), true).unwrap(),
        "user\nHi"
    );
    assert_eq!(
        qwen.decode(&cat(&[&[start], &body]), false).unwrap(),
        "<|im_start|>user\nHi"
    );
    assert!(qwen.is_end_of_generation(end) && qwen.is_end_of_generation(151643));
    assert!(!qwen.is_end_of_generation(start));

    // SentencePiece: a space is prefixed to the text and again after a special token.
    let spm = load(&dir, "llama-spm");
    let hello = enc(&spm, "Hello", false, false);
    let world = enc(&spm, "world", false, false);
    assert_eq!(
        enc(&spm, "Hello<s>world", false, true),
        cat(&[&hello, &[1], &world])
    );
    assert_eq!(spm.encode("Hello", true).unwrap(), cat(&[&[1], &hello]));
    assert_eq!(spm.decode(&hello, true).unwrap(), "Hello");
    assert!(spm.is_end_of_generation(2));

    // Phi-3: whitespace after its special tokens is dropped (llama.cpp sets RSTRIP by model name).
    let phi = load(&dir, "phi-3");
    let hi = enc(&phi, "hi", false, false);
    assert_eq!(
        enc(&phi, "<|end|>  \n hi", false, true),
        cat(&[&[32007], &hi])
    );
    assert_eq!(enc(&phi, "<|end|> hi", false, true), cat(&[&[32007], &hi]));
    assert!(phi.is_end_of_generation(32007) && phi.is_end_of_generation(32000));

    // BOS where the vocabulary (or llama.cpp's default for it) asks for one.
    for (name, bos) in [
        ("llama-bpe", 128000),
        ("gemma-4", 2),
        ("deepseek-llm", 100000),
    ] {
        let tok = load(&dir, name);
        let ids = tok.encode("Hello", true).unwrap();
        assert_eq!(ids[0], bos, "{name}");
        assert_eq!(&ids[1..], &enc(&tok, "Hello", false, false)[..], "{name}");
    }
    let gpt2 = load(&dir, "gpt-2");
    assert_eq!(
        gpt2.encode("Hello", true).unwrap(),
        enc(&gpt2, "Hello", false, false)
    );
}

/// Streaming a SentencePiece model's output after its prompt keeps the first word's space, as
/// llama.cpp's per-token pieces do; decoding the new ids alone would strip it.
#[test]
fn streamed_text_after_the_prompt_keeps_the_first_space() {
    let Some(dir) = vectors_dir() else { return };
    let spm = load(&dir, "llama-spm");
    let prompt = spm.encode("Say hi:", false).unwrap();
    let reply = spm.encode("Hello world", false).unwrap();
    let stream = |mut d: moe_runtime::tokenizer::Detokenizer| {
        let mut out: String = reply.iter().map(|&id| d.push(id)).collect();
        out += &d.finish();
        out
    };
    let after = moe_runtime::tokenizer::Detokenizer::after(&spm, true, &prompt);
    assert_eq!(stream(after), " Hello world");
    assert_eq!(stream(spm.stream(true)), "Hello world");
}

/// Every case's ids spell its text in bytes (what grammars match and `logprobs` report), with
/// the leading space a SentencePiece vocabulary adds; each special token is marked as such.
#[test]
fn token_bytes_spell_the_text() {
    let Some(dir) = vectors_dir() else { return };
    let mut failures = Vec::new();
    for name in VOCABS {
        let tok = load(&dir, name);
        let cases = read_cases(&dir.join(format!("ggml-vocab-{name}.gguf")));
        let mut wrong = 0;
        for (text, ids) in &cases {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&id| tok.token_bytes(id).expect("ids of the vocabulary"))
                .collect();
            let spelled =
                bytes == text.as_bytes() || bytes.strip_prefix(b" ") == Some(text.as_bytes());
            if !spelled {
                wrong += 1;
                if wrong == 1 {
                    failures.push(format!(
                        "{name}: {text:?} spelled {:?}",
                        String::from_utf8_lossy(&bytes)
                    ));
                }
            }
        }
        if wrong > 0 {
            failures.push(format!("{name}: {wrong}/{} cases misspelled", cases.len()));
        }
        if let Some(eos) = tok.eos() {
            assert!(tok.is_special(eos), "{name}: EOS {eos} is a special token");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
