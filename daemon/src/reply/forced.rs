//! The grammar of each family's tool calls, in the family's own syntax (the forms llama.cpp's
//! `common/chat.cpp` builds grammars for, the ones [`super::calls`] parses): what a forced call
//! (`tool_choice: "required"` or a named function) must look like, with arguments held to the
//! tool's JSON schema where the syntax carries JSON, and to strings or typed JSON values where
//! it carries parameters one by one (Qwen3-Coder's XML, GLM's argument tags, LFM2's Python).

use moe_runtime::grammar::{CallPart, ToolCallGrammar, ToolChoice};
use serde_json::{json, Map, Value};

use super::calls::{
    DEEPSEEK, DEEPSEEK_CALL, DEEPSEEK_SEP, GRANITE, KIMI, KIMI_ARGS, KIMI_CALL, LFM2, MISTRAL,
    MISTRAL_ARGS, TOOL_CALL,
};
use super::ReplySyntax;

/// How a family writes one call (a finer split than [`super::ToolSyntax`], which only says how
/// to find and parse calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallForm {
    /// No calls, or a form moed cannot force.
    None,
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen2.5/3, Granite 4).
    Json,
    /// `<tool_call>\n<function=NAME>\n<parameter=K>\nV\n</parameter>\n</function>\n</tool_call>`
    /// (Qwen3-Coder, Qwen3.5).
    QwenXml,
    /// `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n</tool_call>` (GLM-4.5).
    Glm,
    /// DeepSeek-V3.1: `NAME<｜tool▁sep｜>{args}` in call markers, in a section.
    DeepSeekV31,
    /// DeepSeek-V3 and R1: `function<｜tool▁sep｜>NAME\n```json\n{args}\n```` in call markers.
    DeepSeekV3,
    /// Kimi-K2: `functions.NAME:I<|tool_call_argument_begin|>{args}` in call markers.
    Kimi,
    /// Mistral Nemo: `[TOOL_CALLS][{"name", "arguments", "id"}, ...]`.
    MistralList,
    /// Mistral Small 3.2, Devstral, Magistral: `[TOOL_CALLS]NAME[ARGS]{args}` per call.
    MistralArgs,
    /// Granite 3.x: `<|tool_call|>[{"name", "arguments"}, ...]`.
    Granite,
    /// LFM2: `<|tool_call_start|>[NAME(key=value, ...), ...]<|tool_call_end|>`.
    Lfm2,
    /// gpt-oss: `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{args}`.
    Harmony,
}

impl CallForm {
    /// The form a chat template writes its calls in.
    pub fn of_template(source: &str, syntax: &ReplySyntax) -> Self {
        use super::ToolSyntax as T;
        let has = |m: &str| source.contains(m);
        match syntax.tools {
            T::None => Self::None,
            T::Harmony => Self::Harmony,
            T::TaggedBlock if has("<function=") => Self::QwenXml,
            T::TaggedBlock if has("<arg_key>") => Self::Glm,
            T::TaggedBlock => Self::Json,
            T::DeepSeek if has("```json") => Self::DeepSeekV3,
            T::DeepSeek => Self::DeepSeekV31,
            T::Kimi => Self::Kimi,
            T::Mistral if has(MISTRAL_ARGS) => Self::MistralArgs,
            T::Mistral => Self::MistralList,
            T::Granite => Self::Granite,
            T::Lfm2 => Self::Lfm2,
        }
    }
}

fn lit(s: impl Into<String>) -> CallPart {
    CallPart::Lit(s.into())
}

fn until(end: &str, max: Option<usize>) -> CallPart {
    CallPart::TextUntil {
        end: end.into(),
        max,
    }
}

/// A tool's `parameters`, or any object when it has none.
fn params_schema(params: &Value) -> Value {
    if params.is_object() {
        params.clone()
    } else {
        json!({"type": "object"})
    }
}

/// `{"name": NAME, "arguments": {...}}` (and more properties) as a schema.
fn named_call(name: &str, params: &Value, extra: &[(&str, Value)]) -> Value {
    let mut props = Map::new();
    props.insert("name".into(), json!({"const": name}));
    props.insert("arguments".into(), params_schema(params));
    let mut required = vec![json!("name"), json!("arguments")];
    for (k, v) in extra {
        props.insert(k.to_string(), v.clone());
        required.push(json!(k));
    }
    json!({"type": "object", "properties": props, "required": required,
           "additionalProperties": false})
}

/// A tool's parameters one by one: (name, schema, required), in the schema's order.
fn parameters(params: &Value) -> Vec<(String, Value, bool)> {
    let required: Vec<&str> = params
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    params
        .get("properties")
        .and_then(Value::as_object)
        .map(|props| {
            props
                .iter()
                .map(|(k, s)| (k.clone(), s.clone(), required.contains(&k.as_str())))
                .collect()
        })
        .unwrap_or_default()
}

/// Parameters written one by one, in the schema's order: the required ones, then each optional
/// one or not (once at most, so a small model cannot loop on them), `sep` between two.
fn each_parameter(
    params: &Value,
    sep: &[CallPart],
    one: impl Fn(&str, &Value) -> Vec<CallPart>,
) -> Vec<CallPart> {
    let all = parameters(params);
    let required: Vec<Vec<CallPart>> = all
        .iter()
        .filter(|p| p.2)
        .map(|(k, s, _)| one(k, s))
        .collect();
    let optional: Vec<Vec<CallPart>> = all
        .iter()
        .filter(|p| !p.2)
        .map(|(k, s, _)| one(k, s))
        .collect();
    let then = |item: &Vec<CallPart>| -> CallPart {
        let mut with_sep = sep.to_vec();
        with_sep.extend(item.iter().cloned());
        CallPart::Opt(with_sep)
    };
    let mut out = Vec::new();
    for (i, item) in required.iter().enumerate() {
        if i > 0 {
            out.extend(sep.iter().cloned());
        }
        out.extend(item.iter().cloned());
    }
    if !required.is_empty() || sep.is_empty() {
        for item in &optional {
            out.push(if required.is_empty() {
                CallPart::Opt(item.clone())
            } else {
                then(item)
            });
        }
    } else if !optional.is_empty() {
        // No required parameter and a separator: the first one written has none before it.
        let firsts = (0..optional.len())
            .map(|i| {
                let mut alt = optional[i].clone();
                alt.extend(optional[i + 1..].iter().map(then));
                alt
            })
            .collect();
        out.push(CallPart::Opt(vec![CallPart::Alt(firsts)]));
    }
    out
}

/// Whether a parameter's value may be a string (the templates then write it as it is, not as
/// JSON): a string type, or no type at all.
fn may_be_string(schema: &Value) -> bool {
    match schema.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "string"),
        _ => {
            let consts: Vec<&Value> = match (schema.get("enum"), schema.get("const")) {
                (Some(Value::Array(e)), _) => e.iter().collect(),
                (_, Some(c)) => vec![c],
                _ => return schema.get("anyOf").is_none() && schema.get("oneOf").is_none(),
            };
            consts.iter().any(|v| v.is_string())
        }
    }
}

/// A parameter's value between tags, ended by `end`: a string as it is (one of the enum's
/// strings when it has one), else JSON for its schema.
fn tagged_value(schema: &Value, end: &str) -> Vec<CallPart> {
    let strings: Option<Vec<&str>> = match (schema.get("enum"), schema.get("const")) {
        (Some(Value::Array(e)), _) => e.iter().map(Value::as_str).collect(),
        (_, Some(c)) => c.as_str().map(|c| vec![c]),
        _ => None,
    };
    match strings {
        Some(strings) if !strings.is_empty() => vec![
            CallPart::Alt(strings.into_iter().map(|s| vec![lit(s)]).collect()),
            lit(end),
        ],
        _ if may_be_string(schema) => {
            let max = schema.get("maxLength").and_then(Value::as_u64);
            vec![until(end, max.map(|n| n as usize))]
        }
        _ => vec![CallPart::Json(schema.clone()), lit(end)],
    }
}

/// Where the prompt leaves the reply's reasoning block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reasoning {
    /// The reply may open one.
    Allowed,
    /// The prompt opened it.
    Open,
    /// The prompt closed it (thinking off): the reply has none.
    Off,
}

impl Reasoning {
    /// Where a prompt ending with `prompt_tail` leaves it, for `syntax`.
    pub fn after(syntax: &ReplySyntax, prompt_tail: &str) -> Self {
        if syntax.reasoning_open(prompt_tail) {
            Self::Open
        } else if syntax.reasoning_closed(prompt_tail) {
            Self::Off
        } else {
            Self::Allowed
        }
    }
}

/// The grammar of calls to `tools` (name and `parameters`) in `form`, after the reasoning
/// block `syntax` allows (`reasoning`: where the prompt left it): calls only (`Required`), or
/// text with calls held to it once their first marker is written (`Auto`); None when moed
/// cannot write the form (none, or Harmony with `Auto`: its calls start like its answers).
pub fn tool_call_grammar(
    form: CallForm,
    syntax: &ReplySyntax,
    tools: &[(String, Value)],
    choice: ToolChoice,
    parallel: bool,
    reasoning: Reasoning,
) -> Option<ToolCallGrammar> {
    if form == CallForm::Harmony && choice == ToolChoice::Auto {
        return None;
    }
    let mut g = ToolCallGrammar {
        section_open: vec![],
        section_close: vec![],
        calls: vec![],
        separator: vec![],
        choice,
        parallel,
        reasoning: syntax
            .reasoning
            .and_then(|(open, close)| match (reasoning, choice) {
                // Forced calls come at once, as in llama.cpp's grammars (a model that has been
                // made to call a tool does not get to ramble first).
                (Reasoning::Off, _) | (Reasoning::Allowed, ToolChoice::Required) => None,
                (Reasoning::Allowed, ToolChoice::Auto) => {
                    Some((vec![lit(open), until(close, None), CallPart::Ws], false))
                }
                // The prompt opened the block: with calls forced, it is closed at once (as
                // llama.cpp's grammars do), else it holds free text up to its end.
                (Reasoning::Open, ToolChoice::Required) => {
                    Some((vec![lit(close), CallPart::Ws], true))
                }
                (Reasoning::Open, ToolChoice::Auto) => {
                    Some((vec![until(close, None), CallPart::Ws], true))
                }
            }),
    };
    let call = |f: &dyn Fn(&str, &Value) -> Vec<CallPart>| -> Vec<Vec<CallPart>> {
        tools.iter().map(|(name, p)| f(name, p)).collect()
    };
    let args = |p: &Value| CallPart::Json(params_schema(p));
    match form {
        CallForm::None => return None,
        CallForm::Json => {
            let schemas = tools.iter().map(|(n, p)| named_call(n, p, &[])).collect();
            let j = ToolCallGrammar::wrapped_json(TOOL_CALL.0, TOOL_CALL.1, schemas, g.choice);
            g.calls = j.calls;
            g.separator = j.separator;
        }
        CallForm::QwenXml => {
            g.calls = call(&|name, p| {
                let mut c = vec![lit(TOOL_CALL.0), lit(format!("\n<function={name}>\n"))];
                c.extend(each_parameter(p, &[], |k, s| {
                    let mut param = vec![lit(format!("<parameter={k}>\n"))];
                    param.extend(tagged_value(s, "\n</parameter>"));
                    param.push(lit("\n"));
                    param
                }));
                c.extend([lit("</function>\n"), lit(TOOL_CALL.1)]);
                c
            });
            g.separator = vec![lit("\n")];
        }
        CallForm::Glm => {
            g.calls = call(&|name, p| {
                let mut c = vec![lit(TOOL_CALL.0), lit(name)];
                c.extend(each_parameter(p, &[], |k, s| {
                    let mut param = vec![
                        lit("\n"),
                        lit("<arg_key>"),
                        lit(k),
                        lit("</arg_key>"),
                        lit("\n"),
                        lit("<arg_value>"),
                    ];
                    param.extend(tagged_value(s, "</arg_value>"));
                    param
                }));
                c.extend([lit("\n"), lit(TOOL_CALL.1)]);
                c
            });
            g.separator = vec![lit("\n")];
        }
        CallForm::DeepSeekV31 | CallForm::DeepSeekV3 => {
            g.section_open = vec![lit(DEEPSEEK.0)];
            g.section_close = vec![lit(DEEPSEEK.1)];
            g.calls = call(&|name, p| {
                let mut c = vec![lit(DEEPSEEK_CALL.0)];
                if form == CallForm::DeepSeekV3 {
                    c.extend([
                        lit("function"),
                        lit(DEEPSEEK_SEP),
                        lit(format!("{name}\n```json\n")),
                        args(p),
                        lit("\n```"),
                    ]);
                } else {
                    c.extend([lit(name), lit(DEEPSEEK_SEP), args(p)]);
                }
                c.push(lit(DEEPSEEK_CALL.1));
                c
            });
        }
        CallForm::Kimi => {
            g.section_open = vec![lit(KIMI.0)];
            g.section_close = vec![lit(KIMI.1)];
            g.calls = call(&|name, p| {
                vec![
                    lit(KIMI_CALL.0),
                    lit(format!("functions.{name}:")),
                    CallPart::Digits,
                    lit(KIMI_ARGS),
                    args(p),
                    lit(KIMI_CALL.1),
                ]
            });
        }
        CallForm::MistralList => {
            g.section_open = vec![lit(MISTRAL), lit("[")];
            g.section_close = vec![lit("]")];
            // The template refuses ids other than 9 letters or digits.
            let id = json!({"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"});
            g.calls =
                call(&|name, p| vec![CallPart::Json(named_call(name, p, &[("id", id.clone())]))]);
            g.separator = vec![lit(", ")];
        }
        CallForm::MistralArgs => {
            g.calls = call(&|name, p| vec![lit(MISTRAL), lit(name), lit(MISTRAL_ARGS), args(p)]);
        }
        CallForm::Granite => {
            g.section_open = vec![lit(GRANITE), lit("[")];
            g.section_close = vec![lit("]")];
            g.calls = call(&|name, p| vec![CallPart::Json(named_call(name, p, &[]))]);
            g.separator = vec![lit(", ")];
        }
        CallForm::Lfm2 => {
            g.section_open = vec![lit(LFM2.0), lit("[")];
            g.section_close = vec![lit("]"), lit(LFM2.1)];
            // Python keyword arguments; JSON values are Python literals but for true, false and
            // null, which the parser takes too.
            g.calls = call(&|name, p| {
                let mut c = vec![lit(format!("{name}("))];
                c.extend(each_parameter(p, &[lit(", ")], |k, s| {
                    vec![lit(format!("{k}=")), CallPart::Json(s.clone())]
                }));
                c.push(lit(")"));
                c
            });
            g.separator = vec![lit(", ")];
        }
        CallForm::Harmony => {
            // `<|call|>` ends the generation (an end-of-generation token), so one call per
            // answer.
            g.parallel = false;
            // Its analysis channel is the reasoning: only with `auto` (calls come at once when
            // forced, as for every family).
            g.reasoning = (choice == ToolChoice::Auto).then(|| {
                (
                    vec![
                        lit("<|channel|>"),
                        lit("analysis"),
                        lit("<|message|>"),
                        until("<|end|>", None),
                        lit("<|start|>"),
                        lit("assistant"),
                    ],
                    false,
                )
            });
            g.calls = call(&|name, p| {
                vec![
                    lit("<|channel|>"),
                    lit(format!("commentary to=functions.{name}")),
                    CallPart::Opt(vec![lit(" ")]),
                    CallPart::Opt(vec![lit("<|constrain|>"), lit("json")]),
                    lit("<|message|>"),
                    args(p),
                ]
            });
        }
    }
    if g.calls.is_empty() {
        return None;
    }
    Some(g)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use moe_runtime::grammar::{Grammar, GrammarVocab};

    use super::*;
    use crate::reply::{ReplyEvent, ReplyParser, ToolCall};

    /// Every byte as a token, plus `<tool_call>` and `</tool_call>` as special tokens (as in
    /// Qwen's vocabulary) and an end-of-generation token.
    fn vocab() -> Arc<GrammarVocab> {
        let mut words: Vec<Vec<u8>> = (0u8..=255).map(|b| vec![b]).collect();
        for s in ["<tool_call>", "</tool_call>", "<|eot|>"] {
            let mut b = vec![0xFF];
            b.extend_from_slice(s.as_bytes());
            words.push(b);
        }
        let eot = words.len() as u32 - 1;
        Arc::new(GrammarVocab::from_token_bytes(words, &[eot]).unwrap())
    }

    /// Whether the grammar takes all of `text` (its special tokens as tokens) and may end there.
    fn accepts(v: &Arc<GrammarVocab>, g: &ToolCallGrammar, text: &str) -> bool {
        let lark = g.to_lark(v).unwrap();
        let c = v
            .compile(&Grammar::Lark(lark.clone()))
            .unwrap_or_else(|e| panic!("{e}\n{lark}"));
        let mut s = c.start();
        let mut rest = text;
        let mut ids = Vec::new();
        while !rest.is_empty() {
            let special = ["<tool_call>", "</tool_call>"]
                .into_iter()
                .find(|m| rest.starts_with(m));
            match special {
                Some(m) => {
                    ids.push(v.special_token(m).unwrap());
                    rest = &rest[m.len()..];
                }
                None => {
                    let n = ["<tool_call>", "</tool_call>"]
                        .iter()
                        .filter_map(|m| rest.find(m))
                        .min()
                        .unwrap_or(rest.len());
                    ids.extend(v.greedy_tokenize(&rest.as_bytes()[..n]));
                    rest = &rest[n..];
                }
            }
        }
        for id in ids {
            if !s.allows(id).unwrap() {
                return false;
            }
            s.accept(id).unwrap();
        }
        s.is_accepting().unwrap()
    }

    fn tools() -> Vec<(String, Value)> {
        vec![
            (
                "get_weather".into(),
                json!({"type": "object", "properties": {
                    "city": {"type": "string"}, "days": {"type": "integer"},
                    "unit": {"enum": ["c", "f"]}},
                    "required": ["city", "days"]}),
            ),
            ("ping".into(), Value::Null),
        ]
    }

    fn parse(syntax: &ReplySyntax, text: &str) -> Vec<ToolCall> {
        let mut p = ReplyParser::new(syntax.clone(), "");
        let mut events = p.push(text);
        events.extend(p.finish(false));
        events
            .into_iter()
            .map(|e| match e {
                ReplyEvent::ToolCall(c) => c,
                other => panic!("not a call: {other:?} in {text:?}"),
            })
            .collect()
    }

    /// Per family: a call as the template writes it is what the grammar allows, and what the
    /// parser reads back; arguments against the schema are refused.
    #[test]
    fn each_family_parses_what_its_grammar_allows() {
        let v = vocab();
        let weather = r#"{"city":"Oslo","days":3}"#;
        let cases: &[(&str, &str, &str)] = &[
            (
                "<tool_call>\n{\"name\": <function-name>}",
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 3}}\n</tool_call>",
                "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>",
            ),
            (
                "<tool_call>\n<function=",
                "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
                "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>",
            ),
            (
                "<tool_call>{{ name }}<arg_key>",
                "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
                "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
            ),
            (
                "<｜tool▁calls▁begin｜><｜tool▁sep｜>",
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\", \"days\": 3}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": 3, \"days\": 3}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ),
            (
                "<｜tool▁calls▁begin｜>```json",
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Oslo\", \"days\": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n{\"city\": \"Oslo\", \"days\": 3}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ),
            (
                "<|tool_calls_section_begin|>",
                "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Oslo\", \"days\": 3}<|tool_call_end|><|tool_calls_section_end|>",
                "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather<|tool_call_argument_begin|>{\"city\": \"Oslo\", \"days\": 3}<|tool_call_end|><|tool_calls_section_end|>",
            ),
            (
                "[TOOL_CALLS]",
                "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 3}, \"id\": \"a1b2c3d4e\"}]",
                "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 3}, \"id\": \"short\"}]",
            ),
            (
                "[TOOL_CALLS][ARGS]",
                "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Oslo\", \"days\": 3}",
                "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Oslo\", \"days\": 3, \"x\": 1, }",
            ),
            (
                "<|tool_call|>",
                "<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 3}}]",
                "<|tool_call|>[{\"name\": \"get_time\", \"arguments\": {}}]",
            ),
            (
                "<|tool_call_start|>",
                "<|tool_call_start|>[get_weather(city=\"Oslo\", days=3)]<|tool_call_end|>",
                "<|tool_call_start|>[get_weather(days=3, city=\"Oslo\")]<|tool_call_end|>",
            ),
            (
                "<|start|>{{ x }}<|channel|>final<|message|>",
                "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Oslo\", \"days\": 3}",
                "<|channel|>commentary to=functions.get_weather<|message|>{\"days\": 3}",
            ),
        ];
        for (template, good, bad) in cases {
            let syntax = ReplySyntax::of_template(template);
            assert_ne!(syntax.form, CallForm::None, "{template}");
            let g = tool_call_grammar(
                syntax.form,
                &syntax,
                &tools(),
                ToolChoice::Required,
                true,
                Reasoning::Allowed,
            )
            .unwrap();
            assert!(accepts(&v, &g, good), "{:?} refuses {good}", syntax.form);
            assert!(!accepts(&v, &g, bad), "{:?} takes {bad}", syntax.form);
            assert!(!accepts(&v, &g, "plain text"), "{:?}", syntax.form);
            let calls = parse(&syntax, good);
            assert_eq!(calls.len(), 1, "{good}");
            assert_eq!(calls[0].name, "get_weather");
            assert_eq!(calls[0].arguments, weather, "{:?}", syntax.form);
        }
    }

    /// Strings between tags are free text up to the closing tag (bounded by `maxLength`),
    /// optional parameters come after the required ones in schema order, once at most.
    #[test]
    fn tagged_parameters() {
        let v = vocab();
        let syntax = ReplySyntax::of_template("<tool_call>\n<function=");
        let tools = vec![(
            "note".to_string(),
            json!({"type": "object", "properties": {
                "text": {"type": "string", "maxLength": 12}, "tags": {"type": "array"},
                "urgent": {"type": "boolean"}}, "required": ["text"]}),
        )];
        let g = tool_call_grammar(
            syntax.form,
            &syntax,
            &tools,
            ToolChoice::Required,
            false,
            Reasoning::Allowed,
        )
        .unwrap();
        let call = |params: &str| {
            format!("<tool_call>\n<function=note>\n{params}</function>\n</tool_call>")
        };
        let text = "<parameter=text>\nbuy <milk>\n</parameter>\n";
        let urgent = "<parameter=urgent>\ntrue\n</parameter>\n";
        let tags = "<parameter=tags>\n[\"a\"]\n</parameter>\n";
        assert!(accepts(&v, &g, &call(text)));
        assert!(accepts(&v, &g, &call(&format!("{text}{tags}{urgent}"))));
        assert!(accepts(&v, &g, &call(&format!("{text}{urgent}"))));
        assert!(!accepts(&v, &g, &call(&format!("{text}{tags}{tags}"))));
        assert!(!accepts(&v, &g, &call(urgent)));
        assert!(!accepts(
            &v,
            &g,
            &call("<parameter=text>\nfar more than twelve\n</parameter>\n")
        ));
        assert!(!accepts(
            &v,
            &g,
            &call(&format!("{text}<parameter=urgent>\nyes\n</parameter>\n"))
        ));
        let calls = parse(&syntax, &call(&format!("{text}{urgent}")));
        assert_eq!(calls[0].arguments, r#"{"text":"buy <milk>","urgent":true}"#);
    }

    /// `auto`: free text; once the first marker of the calls is written, the calls' grammar.
    #[test]
    fn auto_holds_calls_after_their_marker() {
        let v = vocab();
        for (template, call) in [
            (
                "<｜tool▁calls▁begin｜><｜tool▁sep｜>",
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>ping<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ),
            (
                "<tool_call>\n<function=",
                "<tool_call>\n<function=ping>\n</function>\n</tool_call>",
            ),
        ] {
            let syntax = ReplySyntax::of_template(template);
            let g = tool_call_grammar(syntax.form, &syntax, &tools(), ToolChoice::Auto, true, Reasoning::Allowed)
                .unwrap();
            assert!(accepts(&v, &g, "Just text, <b>tags</b> too."), "{template}");
            assert!(accepts(&v, &g, &format!("Let me see. {call}")), "{template}");
            assert!(accepts(&v, &g, &format!("a{call}b{call}")), "{template}");
            assert!(accepts(&v, &g, &format!("{call}\n{call}")), "{template}");
            assert!(accepts(&v, &g, &format!("{call}{call}")), "{template}");
            let bad = call.replace("ping", "pong");
            assert!(!accepts(&v, &g, &format!("Let me see. {bad}")), "{template}");
        }
        // Harmony's calls start like its answers: not constrained.
        let h = ReplySyntax::of_template("<|start|>{{ x }}<|channel|>final<|message|>");
        assert!(tool_call_grammar(
            h.form,
            &h,
            &tools(),
            ToolChoice::Auto,
            true,
            Reasoning::Allowed
        )
        .is_none());
    }
}
