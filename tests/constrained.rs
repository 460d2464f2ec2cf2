//! Constrained decoding on the small trained model (`models/small-moe/`, which knows English
//! only loosely): what it writes under a JSON schema parses and validates against the schema,
//! under `json_object` is an object, under a GBNF grammar matches the grammar; and a request
//! without a grammar (or with one that allows everything the model writes) gives exactly the
//! tokens of the plain sampling loop.

use std::path::Path;
use std::sync::Arc;

use moe_runtime::engine::{generate, GenerationStats, Request, StopReason};
use moe_runtime::gguf::GgufFile;
use moe_runtime::grammar::{Constraint, Grammar, GrammarVocab};
use moe_runtime::model::{KvType, Model, Session};
use moe_runtime::sampling::{Sampler, SamplerConfig};
use moe_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn model_file() -> GgufFile {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/small-moe/small-moe-q8_0.gguf");
    GgufFile::open(&path).expect("the committed small-moe file opens")
}

struct Run {
    ids: Vec<u32>,
    text: String,
    stats: GenerationStats,
}

fn run(
    file: &GgufFile,
    prompt: &str,
    cfg: SamplerConfig,
    max_tokens: usize,
    constraint: Option<&Constraint>,
) -> Run {
    let model = Model::load(file).unwrap();
    let tok = Tokenizer::from_gguf(file.header()).unwrap();
    let mut session = Session::with_kv_type(&model, 512, KvType::F32);
    let mut sampler = Sampler::new(cfg);
    let prompt = tok.encode(prompt, false).unwrap();
    let mut ids = Vec::new();
    let mut text = String::new();
    let request = Request {
        prompt: &prompt,
        cached: 0,
        max_tokens,
        stop: &[],
        ignore_eos: false,
        skip_special: true,
        top_logprobs: None,
        constraint,
    };
    let stats = generate(&mut session, &mut sampler, Some(&tok), &request, |piece| {
        ids.extend(piece.id);
        text.push_str(piece.text);
        true
    })
    .unwrap();
    Run { ids, text, stats }
}

fn vocab(file: &GgufFile) -> Arc<GrammarVocab> {
    let tok = Tokenizer::from_gguf(file.header()).unwrap();
    let n_vocab = Model::load(file).unwrap().hp.n_vocab;
    Arc::new(GrammarVocab::new(&tok, n_vocab).unwrap())
}

fn sampling(seed: u64) -> SamplerConfig {
    SamplerConfig {
        temperature: 0.8,
        seed,
        ..SamplerConfig::default()
    }
}

/// The few JSON Schema keywords the test schemas use, checked by hand.
fn validate(v: &Value, schema: &Value, path: &str) -> Result<(), String> {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(v) {
            return Err(format!("{path}: {v} is not one of {values:?}"));
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let obj = v.as_object().ok_or(format!("{path}: not an object"))?;
            let props = schema["properties"].as_object().unwrap();
            for key in schema["required"].as_array().into_iter().flatten() {
                let key = key.as_str().unwrap();
                if !obj.contains_key(key) {
                    return Err(format!("{path}: `{key}` is missing"));
                }
            }
            for (k, x) in obj {
                match props.get(k) {
                    Some(s) => validate(x, s, &format!("{path}.{k}"))?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return Err(format!("{path}: `{k}` is not allowed"))
                    }
                    None => {}
                }
            }
        }
        Some("array") => {
            let items = v.as_array().ok_or(format!("{path}: not an array"))?;
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    return Err(format!("{path}: more than {max} items"));
                }
            }
            for (i, x) in items.iter().enumerate() {
                validate(x, &schema["items"], &format!("{path}[{i}]"))?;
            }
        }
        Some("string") => {
            let s = v.as_str().ok_or(format!("{path}: not a string"))?;
            let n = s.chars().count() as u64;
            if schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
                || schema
                    .get("minLength")
                    .and_then(Value::as_u64)
                    .is_some_and(|m| n < m)
            {
                return Err(format!("{path}: length {n} out of bounds"));
            }
        }
        Some("integer") => {
            let n = v.as_i64().ok_or(format!("{path}: not an integer"))?;
            if schema
                .get("minimum")
                .and_then(Value::as_i64)
                .is_some_and(|m| n < m)
                || schema
                    .get("maximum")
                    .and_then(Value::as_i64)
                    .is_some_and(|m| n > m)
            {
                return Err(format!("{path}: {n} out of range"));
            }
        }
        Some("boolean") => {
            v.as_bool().ok_or(format!("{path}: not a boolean"))?;
        }
        Some(t) => return Err(format!("{path}: the test does not know type {t}")),
        None => {}
    }
    Ok(())
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 1, "maximum": 99},
            "mood": {"enum": ["happy", "grave", "restless"]},
            "married": {"type": "boolean"},
            "friends": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        },
        "required": ["name", "age", "mood", "married", "friends"],
        "additionalProperties": false,
    })
}

#[test]
fn json_schema_output_validates() {
    let file = model_file();
    let vocab = vocab(&file);
    let schema = person_schema();
    let c = vocab
        .compile(&Grammar::JsonSchema {
            schema: schema.clone(),
            strict: true,
        })
        .unwrap();
    for seed in [1, 2, 3] {
        let r = run(
            &file,
            "Mr. Darcy was described thus: ",
            sampling(seed),
            200,
            Some(&c),
        );
        assert_eq!(
            r.stats.stop,
            StopReason::EndOfGeneration,
            "seed {seed}: {:?}",
            r.text
        );
        let v: Value = serde_json::from_str(&r.text)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", r.text));
        validate(&v, &schema, "$").unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", r.text));
        println!("seed {seed}: {:?}", r.text);
    }
    // Greedy too.
    let greedy = SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    };
    let r = run(&file, "Emma wrote:", greedy, 200, Some(&c));
    let v: Value = serde_json::from_str(&r.text).unwrap_or_else(|e| panic!("{e}: {:?}", r.text));
    validate(&v, &schema, "$").unwrap();
}

#[test]
fn json_object_output_is_an_object() {
    let file = model_file();
    let c = vocab(&file).compile(&Grammar::JsonObject).unwrap();
    for seed in 4..7 {
        let r = run(&file, "The letter said", sampling(seed), 120, Some(&c));
        assert!(r.text.starts_with('{'), "{:?}", r.text);
        // This model, free to write any object, writes dialogue until it runs out of tokens:
        // what it wrote must then be the beginning of an object.
        match serde_json::from_str::<Value>(&r.text) {
            Ok(v) => assert!(v.is_object() && r.stats.stop == StopReason::EndOfGeneration),
            Err(e) => {
                assert!(e.is_eof(), "{e}: {:?}", r.text);
                assert_eq!(r.stats.stop, StopReason::Length);
            }
        }
    }
    // A finished one, under a schema that leaves little room.
    let c = vocab(&file)
        .compile(&Grammar::JsonSchema {
            schema: json!({"type": "object", "maxProperties": 1,
                           "additionalProperties": {"type": "string", "maxLength": 8}}),
            strict: true,
        })
        .unwrap();
    let r = run(&file, "The letter said", sampling(4), 120, Some(&c));
    let v: Value = serde_json::from_str(&r.text).unwrap_or_else(|e| panic!("{e}: {:?}", r.text));
    assert!(v.as_object().is_some_and(|o| o.len() <= 1), "{v}");
}

/// The lines of `- word word...` the GBNF below allows, checked by hand.
fn is_list(text: &str) -> bool {
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    text.ends_with('\n')
        && (2..=3).contains(&lines.len())
        && lines.iter().all(|l| {
            l.strip_prefix("- ").is_some_and(|rest| {
                (1..=40).contains(&rest.chars().count())
                    && rest.chars().all(|c| c.is_ascii_lowercase() || c == ' ')
            })
        })
}

#[test]
fn gbnf_output_matches_the_grammar() {
    let file = model_file();
    let vocab = vocab(&file);
    let gbnf = "root ::= item{2,3}\nitem ::= \"- \" [a-z ]{1,40} \"\\n\"\n";
    let c = vocab.compile(&Grammar::Gbnf(gbnf.into())).unwrap();
    for seed in [7, 8] {
        let r = run(
            &file,
            "She made a list of her wishes:\n",
            sampling(seed),
            200,
            Some(&c),
        );
        assert_eq!(r.stats.stop, StopReason::EndOfGeneration, "{:?}", r.text);
        assert!(is_list(&r.text), "{:?}", r.text);
        println!("seed {seed}: {:?}", r.text);
    }
    assert!(!is_list("- a\n") && !is_list("- A b\n- c\n") && is_list("- a b\n- c\n"));
}

#[test]
fn unconstrained_generation_is_unchanged() {
    let file = model_file();
    let prompt = "It is a truth universally acknowledged, that";
    let plain = run(&file, prompt, sampling(42), 48, None);

    // The plain loop: forward, sample, stop at an end token.
    let model = Model::load(&file).unwrap();
    let tok = Tokenizer::from_gguf(file.header()).unwrap();
    let mut session = Session::with_kv_type(&model, 512, KvType::F32);
    let mut sampler = Sampler::new(sampling(42));
    let mut history = tok.encode(prompt, false).unwrap();
    let mut logits = session.forward(&history, false).unwrap().to_vec();
    let mut ids = Vec::new();
    for _ in 0..48 {
        let next = sampler.sample(&logits, &history);
        if tok.is_end_of_generation(next) {
            break;
        }
        ids.push(next);
        history.push(next);
        logits = session.forward(&[next], false).unwrap().to_vec();
    }
    assert_eq!(plain.ids, ids);

    // A grammar that allows all the model wrote never rejects a token, so draws nothing more.
    let any_text = vocab(&file)
        .compile(&Grammar::Lark("start: /(.|\\n)*/".into()))
        .unwrap();
    let constrained = run(&file, prompt, sampling(42), 48, Some(&any_text));
    assert_eq!(constrained.ids, plain.ids);
    assert_eq!(constrained.text, plain.text);
}

#[test]
fn a_grammar_overrides_what_the_model_prefers() {
    let file = model_file();
    let c = vocab(&file)
        .compile(&Grammar::Gbnf("root ::= \"yes\" | \"no\"".into()))
        .unwrap();
    for seed in 0..4 {
        let r = run(&file, "The whale", sampling(seed), 16, Some(&c));
        assert!(r.text == "yes" || r.text == "no", "{:?}", r.text);
        assert_eq!(r.stats.stop, StopReason::EndOfGeneration);
    }
}
