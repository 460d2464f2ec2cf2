//! The grammar API on a small byte vocabulary with special tokens.

use std::sync::Arc;

use serde_json::json;

use super::*;

pub(super) const SPECIALS: &[&str] = &["<|im_end|>", "<tool_call>", "</tool_call>", "<|eot|>"];

/// Every byte as a token, a few words, the special tokens (two of them end generation) and two
/// ids past the vocabulary, as a model's logits often have.
pub(super) fn vocab() -> Arc<GrammarVocab> {
    let mut words: Vec<Vec<u8>> = (0u8..=255).map(|b| vec![b]).collect();
    for w in ["{\"", "\":", "true", " the", "name", "ing", "\n\n"] {
        words.push(w.as_bytes().to_vec());
    }
    let mut end = Vec::new();
    for s in SPECIALS {
        if *s == "<|im_end|>" || *s == "<|eot|>" {
            end.push(words.len() as u32);
        }
        let mut b = vec![0xFF];
        b.extend_from_slice(s.as_bytes());
        words.push(b);
    }
    words.push(Vec::new());
    words.push(Vec::new());
    Arc::new(GrammarVocab::from_token_bytes(words, &end).unwrap())
}

/// Feeds `text` (special tokens written with a 0xFF byte before them) token by token: whether
/// every token was allowed, and whether the grammar may end after them.
pub(super) fn feed(c: &Constraint, text: &[u8]) -> (bool, bool) {
    let mut s = c.start();
    let vocab = c.vocab().clone();
    let mut ids = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if rest[0] == 0xFF {
            let end = rest.iter().position(|&b| b == b'>').unwrap() + 1;
            let name = std::str::from_utf8(&rest[1..end]).unwrap();
            ids.push(vocab.special_token(name).unwrap());
            rest = &rest[end..];
        } else {
            let end = rest.iter().position(|&b| b == 0xFF).unwrap_or(rest.len());
            ids.extend(vocab.greedy_tokenize(&rest[..end]));
            rest = &rest[end..];
        }
    }
    for id in ids {
        if !s.allows(id).unwrap() {
            return (false, false);
        }
        s.accept(id).unwrap();
    }
    (true, s.is_accepting().unwrap())
}

pub(super) fn matches(vocab: &Arc<GrammarVocab>, g: &Grammar, text: &str) -> bool {
    let c = vocab.compile(g).unwrap_or_else(|e| panic!("{g:?}: {e}"));
    feed(&c, text.as_bytes()) == (true, true)
}

#[test]
fn json_schema_is_enforced_with_bounded_whitespace() {
    let v = vocab();
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Oslo"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        },
        "required": ["city", "days"],
        "additionalProperties": false,
    });
    let g = Grammar::JsonSchema {
        schema,
        strict: true,
    };
    assert!(matches(&v, &g, r#"{"city":"Paris","days":3}"#));
    assert!(matches(
        &v,
        &g,
        "{\n  \"city\": \"Oslo\",\n  \"days\": 7,\n  \"tags\": [\"a\"]\n}"
    ));
    for bad in [
        r#"{"city":"Rome","days":3}"#,
        r#"{"city":"Paris","days":9}"#,
        r#"{"city":"Paris"}"#,
        r#"{"city":"Paris","days":3,"x":1}"#,
        r#"{"city":"Paris","days":3,"tags":["a","b","c"]}"#,
        "{\"city\":\"Paris\",\"days\":3   }",
    ] {
        assert!(!matches(&v, &g, bad), "{bad}");
    }
    let indent = format!("{{\n{}\"city\":\"Paris\",\"days\":1}}", " ".repeat(21));
    assert!(!matches(&v, &g, &indent));
}

#[test]
fn json_object_is_any_object() {
    let v = vocab();
    assert!(matches(
        &v,
        &Grammar::JsonObject,
        r#"{"a": [1, {"b": true}], "c": null}"#
    ));
    assert!(matches(&v, &Grammar::JsonObject, "{}"));
    assert!(!matches(&v, &Grammar::JsonObject, "[1]"));
    assert!(!matches(&v, &Grammar::JsonObject, "\"text\""));
}

#[test]
fn a_closed_object_finishes_the_grammar() {
    let v = vocab();
    let c = v.compile(&Grammar::JsonObject).unwrap();
    let mut s = c.start();
    let end = v.special_token("<|im_end|>").unwrap();
    let other_end = v.special_token("<|eot|>").unwrap();
    assert!(!s.allows(end).unwrap(), "an empty output is not an object");
    for id in v.greedy_tokenize(b"{\"a\":1}") {
        assert!(!s.is_finished().unwrap());
        assert!(s.allows(id).unwrap());
        s.accept(id).unwrap();
    }
    assert!(s.is_finished().unwrap());
    assert!(s.allows(end).unwrap() && s.allows(other_end).unwrap());
    assert!(!s.allows(b'x' as u32).unwrap());
    // The mask leaves exactly the end tokens, or nothing without them.
    let mut logits = vec![0.0f32; v.n_vocab()];
    assert_eq!(s.mask(&mut logits, true).unwrap(), 2);
    assert!(logits[end as usize] == 0.0 && logits[b'x' as usize] == f32::NEG_INFINITY);
    let mut logits = vec![0.0f32; v.n_vocab()];
    assert_eq!(s.mask(&mut logits, false).unwrap(), 0);
}

#[test]
fn masks_match_the_check_of_single_tokens() {
    let v = vocab();
    let c = v
        .compile(&Grammar::Lark("start: \"the\" /[0-9]+/ | \"name\"".into()))
        .unwrap();
    let mut s = c.start();
    let mut logits = vec![1.0f32; v.n_vocab()];
    let n = s.mask(&mut logits, true).unwrap();
    let allowed: Vec<u32> = (0..v.n_vocab() as u32)
        .filter(|&t| logits[t as usize] == 1.0)
        .collect();
    assert_eq!(allowed.len(), n);
    for t in 0..v.n_vocab() as u32 {
        assert_eq!(s.allows(t).unwrap(), allowed.contains(&t), "token {t}");
    }
    // "t" and "n" bytes and the word "name"; " the" does not start with "t".
    let name = v.greedy_tokenize(b"name")[0];
    assert!(allowed.contains(&(b't' as u32)) && allowed.contains(&name));
    assert!(!allowed.contains(&v.greedy_tokenize(b" the")[0]));
}

#[test]
fn bad_schemas_and_grammars_are_errors() {
    let v = vocab();
    let schema = |s: serde_json::Value, strict| Grammar::JsonSchema { schema: s, strict };
    let e = v
        .compile(&schema(
            json!({"type": "string", "format": "no-such-format"}),
            true,
        ))
        .unwrap_err();
    assert!(matches!(e, GrammarError::Schema(_)), "{e}");
    assert!(e.to_string().contains("no-such-format"), "{e}");
    // Not strict: what llguidance cannot enforce is ignored.
    assert!(v
        .compile(&schema(
            json!({"type": "string", "format": "no-such-format"}),
            false
        ))
        .is_ok());
    assert!(matches!(
        v.compile(&schema(json!([1]), true)),
        Err(GrammarError::Schema(_))
    ));
    assert!(matches!(
        v.compile(&schema(json!({"type": "nope"}), true)),
        Err(GrammarError::Schema(_))
    ));
    assert!(matches!(
        v.compile(&Grammar::Lark("start: nope".into())),
        Err(GrammarError::Compile(_))
    ));
    assert!(matches!(
        v.compile(&Grammar::Gbnf("root ::= \"a".into())),
        Err(GrammarError::Gbnf(_))
    ));
    // Text no token spells.
    let bytes_only =
        Arc::new(GrammarVocab::from_token_bytes(vec![b"a".to_vec(), b"b".to_vec()], &[]).unwrap());
    assert!(matches!(
        bytes_only.compile(&Grammar::Lark("start: \"c\"".into())),
        Err(GrammarError::Compile(_))
    ));
}

#[test]
fn llama_cpp_grammar_field() {
    assert_eq!(
        Grammar::from_llama_cpp("root ::= \"a\""),
        Grammar::Gbnf("root ::= \"a\"".into())
    );
    for lark in ["%llguidance {}\nstart: \"a\"", "// c\n start : \"a\""] {
        assert_eq!(Grammar::from_llama_cpp(lark), Grammar::Lark(lark.into()));
    }
}

#[test]
fn gbnf_keeps_llama_cpp_semantics_where_lexing_is_greedy() {
    let v = vocab();
    let gbnf = |s: &str| Grammar::Gbnf(s.into());
    let ing = gbnf("root ::= w \"ing\"\nw ::= [a-z]+");
    assert!(matches(&v, &ing, "walking"));
    assert!(matches(&v, &ing, "inging"));
    assert!(!matches(&v, &ing, "walk"));
    // The optional whitespace after a word may not eat the newline a line needs.
    let lines = gbnf(
        "root ::= (expr \"=\" ws term \"\\n\")+\nexpr ::= term ([-+*/] term)*\n\
         term ::= ident | num | \"(\" ws expr \")\" ws\nident ::= [a-z] [a-z0-9_]* ws\n\
         num ::= [0-9]+ ws\nws ::= [ \\t\\n]*",
    );
    for ok in ["a=b\n", "a = (b +1)\n", "x1 =\n y \n\n", "a=b\nc=d\n"] {
        assert!(matches(&v, &lines, ok), "{ok:?}");
    }
    for bad in ["a=b", "=b\n", "a=(b\n", "a = (b + 1)\n"] {
        assert!(!matches(&v, &lines, bad), "{bad:?}");
    }
}

fn weather_call() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": false,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

fn tools(open: &str, close: &str, choice: ToolChoice, parallel: bool) -> ToolCallGrammar {
    let calls = vec![
        weather_call(),
        json!({"type": "object", "properties": {"name": {"const": "now"}}, "required": ["name"]}),
    ];
    ToolCallGrammar {
        parallel,
        ..ToolCallGrammar::wrapped_json(open, close, calls, choice)
    }
}

fn special(name: &str) -> Vec<u8> {
    let mut b = vec![0xFF];
    b.extend_from_slice(name.as_bytes());
    b
}

fn tool_accepts(v: &Arc<GrammarVocab>, t: &ToolCallGrammar, text: &[u8]) -> bool {
    let lark = t.to_lark(v).unwrap();
    let c = v
        .compile(&Grammar::Lark(lark.clone()))
        .unwrap_or_else(|e| panic!("{e}\n{lark}"));
    feed(&c, text) == (true, true)
}

#[test]
fn tool_calls_in_special_token_wrappers() {
    let v = vocab();
    let call = |args: &str| {
        let mut b = special("<tool_call>");
        b.extend_from_slice(
            format!("\n{{\"name\": \"get_weather\", \"arguments\": {args}}}\n").as_bytes(),
        );
        b.extend(special("</tool_call>"));
        b
    };
    let good = call(r#"{"city": "Paris"}"#);
    let bad = call(r#"{"town": "Paris"}"#);
    let text_then = |c: &[u8]| [b"Let me check. ".as_slice(), c].concat();

    let auto = tools("<tool_call>", "</tool_call>", ToolChoice::Auto, true);
    assert!(tool_accepts(&v, &auto, b"Just an answer, no call."));
    assert!(tool_accepts(&v, &auto, &text_then(&good)));
    assert!(tool_accepts(
        &v,
        &auto,
        &[good.clone(), good.clone()].concat()
    ));
    assert!(!tool_accepts(&v, &auto, &text_then(&bad)));
    // The special token is never text: an unclosed call does not end.
    assert!(!tool_accepts(&v, &auto, &special("<tool_call>")));

    let required = tools("<tool_call>", "</tool_call>", ToolChoice::Required, false);
    assert!(tool_accepts(&v, &required, &good));
    // A call is one line of JSON.
    assert!(!tool_accepts(
        &v,
        &required,
        &call("{\"city\":\n\n  \"Paris\"}")
    ));
    assert!(!tool_accepts(&v, &required, b"No call."));
    assert!(!tool_accepts(&v, &required, &text_then(&good)));
    assert!(!tool_accepts(
        &v,
        &required,
        &[good.clone(), b"\n".to_vec(), good.clone()].concat()
    ));
    let parallel = tools("<tool_call>", "</tool_call>", ToolChoice::Required, true);
    assert!(tool_accepts(
        &v,
        &parallel,
        &[good.clone(), b"\n".to_vec(), good.clone()].concat()
    ));
    let now = [
        special("<tool_call>"),
        br#"{"name":"now"}"#.to_vec(),
        special("</tool_call>"),
    ]
    .concat();
    assert!(tool_accepts(&v, &parallel, &now));
}

#[test]
fn tool_calls_in_text_wrappers_are_enforced_after_the_trigger() {
    let v = vocab();
    let auto = tools("<function>", "</function>", ToolChoice::Auto, false);
    let call = br#"<function>{"name": "get_weather", "arguments": {"city": "Oslo"}}</function>"#;
    assert!(tool_accepts(
        &v,
        &auto,
        b"Free text, even with <b>tags</b>."
    ));
    assert!(tool_accepts(
        &v,
        &auto,
        &[b"Checking: ".as_slice(), call].concat()
    ));
    assert!(tool_accepts(
        &v,
        &auto,
        &[b"Checking: ".as_slice(), call, b" Done."].concat()
    ));
    assert!(!tool_accepts(
        &v,
        &auto,
        br#"Checking: <function>{"name": "rm -rf"}</function>"#
    ));
    assert!(!tool_accepts(
        &v,
        &auto,
        br#"<function>not json</function>"#
    ));

    let mut required = tools("<function>", "</function>", ToolChoice::Required, false);
    required.reasoning = Some((
        vec![
            CallPart::Lit("<think>".into()),
            CallPart::TextUntil {
                end: "</think>".into(),
                max: None,
            },
            CallPart::Ws,
        ],
        false,
    ));
    assert!(tool_accepts(&v, &required, call));
    assert!(tool_accepts(
        &v,
        &required,
        &[b"<think>Which city? Oslo.</think>\n".as_slice(), call].concat()
    ));
    assert!(!tool_accepts(&v, &required, b"<think>no call</think>"));
    assert!(!tool_accepts(&v, &required, b"plain text"));
}
