use super::*;

fn call(name: &str, args: &str) -> ReplyEvent {
    ReplyEvent::ToolCall(ToolCall {
        name: name.into(),
        arguments: args.into(),
    })
}

/// Parses `reply` in pieces of every size from 1 byte to whole: the events, with consecutive
/// text joined, must not depend on how the reply was cut.
fn parse(syntax: &ReplySyntax, prompt_tail: &str, reply: &str) -> Vec<ReplyEvent> {
    let mut results = Vec::new();
    for size in [1, 2, 3, 5, 7, 13, reply.len().max(1)] {
        let mut p = ReplyParser::new(syntax.clone(), prompt_tail);
        let mut events = Vec::new();
        let chars: Vec<char> = reply.chars().collect();
        for piece in chars.chunks(size) {
            events.extend(p.push(&piece.iter().collect::<String>()));
        }
        events.extend(p.finish(false));
        results.push(join(events));
    }
    for r in &results[1..] {
        assert_eq!(r, &results[0], "pieces change the result for {reply:?}");
    }
    results.remove(0)
}

fn join(events: Vec<ReplyEvent>) -> Vec<ReplyEvent> {
    let mut out: Vec<ReplyEvent> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (Some(ReplyEvent::Content(a)), ReplyEvent::Content(b)) => a.push_str(&b),
            (Some(ReplyEvent::Reasoning(a)), ReplyEvent::Reasoning(b)) => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}

fn content(s: &str) -> ReplyEvent {
    ReplyEvent::Content(s.into())
}

fn reasoning(s: &str) -> ReplyEvent {
    ReplyEvent::Reasoning(s.into())
}

fn syntax(reasoning: Option<(&'static str, &'static str)>, tools: ToolSyntax) -> ReplySyntax {
    ReplySyntax {
        reasoning,
        tools,
        harmony: false,
        form: CallForm::None,
    }
}

const THINK: Option<(&str, &str)> = Some(("<think>", "</think>"));

#[test]
fn qwen3_thinking_then_a_json_tool_call() {
    let s = syntax(THINK, ToolSyntax::TaggedBlock);
    let reply = "<think>\nThe user wants weather.\n</think>\n\nLet me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
    assert_eq!(
        parse(&s, "<|im_start|>assistant\n", reply),
        [
            reasoning("\nThe user wants weather.\n"),
            content("Let me check."),
            call("get_weather", r#"{"city":"Oslo"}"#)
        ]
    );
}

#[test]
fn a_prompt_that_opens_reasoning_starts_there() {
    // Qwen3.5 and DeepSeek-R1 templates end the prompt with `<think>`.
    let s = syntax(THINK, ToolSyntax::TaggedBlock);
    assert_eq!(
        parse(&s, "<|im_start|>assistant\n<think>\n", "hmm</think>Hi!"),
        [reasoning("hmm"), content("Hi!")]
    );
    // An empty reasoning block written by the template leaves the reply as the answer.
    assert_eq!(
        parse(&s, "<｜Assistant｜><think></think>", "Hi!"),
        [content("Hi!")]
    );
}

#[test]
fn qwen3_coder_and_qwen35_xml_calls() {
    let s = syntax(THINK, ToolSyntax::TaggedBlock);
    let reply = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
    assert_eq!(
        parse(&s, "", reply),
        [call("get_weather", r#"{"city":"Oslo","days":3}"#)]
    );
}

#[test]
fn glm_argument_tags() {
    let s = syntax(THINK, ToolSyntax::TaggedBlock);
    let reply = "<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n</tool_call>";
    assert_eq!(
        parse(&s, "", reply),
        [call("get_weather", r#"{"city":"Oslo"}"#)]
    );
}

#[test]
fn deepseek_v3_and_v31_calls() {
    let s = syntax(THINK, ToolSyntax::DeepSeek);
    let v31 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    assert_eq!(
        parse(&s, "", v31),
        [
            call("get_weather", r#"{"city":"Oslo"}"#),
            call("get_time", "{}")
        ]
    );
    let v3 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Oslo\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    assert_eq!(
        parse(&s, "", v3),
        [call("get_weather", r#"{"city":"Oslo"}"#)]
    );
}

#[test]
fn kimi_k2_calls() {
    let s = syntax(THINK, ToolSyntax::Kimi);
    let reply = "Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Oslo\"}<|tool_call_end|><|tool_calls_section_end|>";
    assert_eq!(
        parse(&s, "", reply),
        [
            content("Checking."),
            call("get_weather", r#"{"city":"Oslo"}"#)
        ]
    );
}

#[test]
fn mistral_json_list_and_args_forms() {
    let s = syntax(Some(("[THINK]", "[/THINK]")), ToolSyntax::Mistral);
    let nemo = "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}, \"id\": \"a1b2c3d4e\"}]";
    assert_eq!(
        parse(&s, "", nemo),
        [call("get_weather", r#"{"city":"Oslo"}"#)]
    );
    let ministral =
        "[THINK]Weather needed.[/THINK][TOOL_CALLS]get_weather[ARGS]{\"city\": \"Oslo\"}";
    assert_eq!(
        parse(&s, "", ministral),
        [
            reasoning("Weather needed."),
            call("get_weather", r#"{"city":"Oslo"}"#)
        ]
    );
}

#[test]
fn granite_and_lfm2_calls() {
    let g = syntax(THINK, ToolSyntax::Granite);
    assert_eq!(
        parse(
            &g,
            "",
            "<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]"
        ),
        [call("get_weather", r#"{"city":"Oslo"}"#)]
    );
    let l = syntax(THINK, ToolSyntax::Lfm2);
    assert_eq!(
        parse(
            &l,
            "",
            "<|tool_call_start|>[get_weather(city=\"Oslo\", days=3, metric=True), ping()]<|tool_call_end|>Done."
        ),
        [
            call("get_weather", r#"{"city":"Oslo","days":3,"metric":true}"#),
            call("ping", "{}"),
            content("Done.")
        ]
    );
}

#[test]
fn text_that_is_not_a_call_stays_text() {
    let s = syntax(None, ToolSyntax::TaggedBlock);
    // A block that does not parse is left in the answer, as llama.cpp leaves it.
    assert_eq!(
        parse(&s, "", "a <tool_call>not json</tool_call> b"),
        [content("a <tool_call>not json</tool_call> b")]
    );
    // An unfinished block at the end is text too.
    assert_eq!(
        parse(&s, "", "x <tool_call>{\"name\""),
        [content("x <tool_call>{\"name\"")]
    );
    // Something that only looks like the start of a marker is released.
    assert_eq!(parse(&s, "", "a <tool b"), [content("a <tool b")]);
}

#[test]
fn templates_name_their_syntax() {
    let of = |src: &str| ReplySyntax::of_template(src);
    assert_eq!(of("{{ '<|im_start|>' }}"), ReplySyntax::PLAIN);
    assert_eq!(
        of("<tool_call>\n{{ x }}</tool_call><think>").tools,
        ToolSyntax::TaggedBlock
    );
    assert_eq!(of("<tool_call>").reasoning, None);
    assert_eq!(of("<think>").reasoning, THINK);
    assert_eq!(of("<｜tool▁calls▁begin｜>").tools, ToolSyntax::DeepSeek);
    assert_eq!(
        of("[TOOL_CALLS][THINK]").reasoning,
        Some(("[THINK]", "[/THINK]"))
    );
    assert_eq!(of("<|tool_call_start|>").tools, ToolSyntax::Lfm2);
    // How calls are written, for the grammar that forces them.
    let form = |src: &str| of(src).form;
    assert_eq!(
        form("<tool_call>\n{\"name\": <function-name>}"),
        CallForm::Json
    );
    assert_eq!(
        form("<tool_call>\n<function={{ name }}>"),
        CallForm::QwenXml
    );
    assert_eq!(form("<tool_call>{{ name }}<arg_key>"), CallForm::Glm);
    assert_eq!(
        form("<｜tool▁calls▁begin｜>{{ a }}<｜tool▁sep｜>"),
        CallForm::DeepSeekV31
    );
    assert_eq!(form("<｜tool▁calls▁begin｜>```json"), CallForm::DeepSeekV3);
    assert_eq!(form("[TOOL_CALLS][ARGS]"), CallForm::MistralArgs);
    assert_eq!(form("[TOOL_CALLS]"), CallForm::MistralList);
    assert_eq!(form("{{ '<|im_start|>' }}"), CallForm::None);
}

/// Parses `reply` as a generation that `max_tokens` cut short, in pieces of every size.
fn parse_cut(syntax: &ReplySyntax, reply: &str) -> Vec<ReplyEvent> {
    let mut results = Vec::new();
    for size in [1, 2, 3, 5, 7, reply.len().max(1)] {
        let mut p = ReplyParser::new(syntax.clone(), "");
        let mut events = Vec::new();
        let chars: Vec<char> = reply.chars().collect();
        for piece in chars.chunks(size) {
            events.extend(p.push(&piece.iter().collect::<String>()));
        }
        events.extend(p.finish(true));
        results.push(join(events));
    }
    for r in &results[1..] {
        assert_eq!(r, &results[0], "pieces change the result for {reply:?}");
    }
    results.remove(0)
}

/// A call that `max_tokens` cuts off is dropped: no marker or half call in the answer, in any
/// family; calls completed before the cut are kept.
#[test]
fn a_call_cut_short_leaves_no_markup() {
    let cases: [(ToolSyntax, &str); 8] = [
        (ToolSyntax::TaggedBlock, "<tool_call>\n{\"name\": \"get_weather\", \"argu"),
        (ToolSyntax::TaggedBlock, "<tool_call>\n<function=get_weather>\n<parameter=ci"),
        (ToolSyntax::TaggedBlock, "<tool_call>get_weather\n<arg_key>city</arg_key>"),
        (ToolSyntax::DeepSeek, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"ci"),
        (ToolSyntax::Kimi, "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\""),
        (ToolSyntax::Mistral, "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Os"),
        (ToolSyntax::Granite, "<|tool_call|>[{\"name\": \"get_weather\""),
        (ToolSyntax::Lfm2, "<|tool_call_start|>[get_weather(city=\"Os"),
    ];
    for (tools, cut) in cases {
        let s = syntax(THINK, tools);
        let reply = format!("Checking. {cut}");
        assert_eq!(parse_cut(&s, &reply), [content("Checking. ")], "{reply}");
        // Cut inside the opening marker itself.
        let marker = tools.starts()[0];
        let half = &marker[..marker.char_indices().nth(3).unwrap().0];
        assert_eq!(
            parse_cut(&s, &format!("Checking. {half}")),
            [content("Checking. ")],
            "{half}"
        );
    }
    // Cut inside a character of a marker: the replacement character goes too.
    let s = syntax(THINK, ToolSyntax::DeepSeek);
    assert_eq!(parse_cut(&s, "Hi <\u{FFFD}"), [content("Hi ")]);
    assert_eq!(parse_cut(&s, "Hi \u{FFFD}"), [content("Hi \u{FFFD}")]);
    // Reasoning cut inside its closing marker.
    let s = syntax(THINK, ToolSyntax::TaggedBlock);
    assert_eq!(parse_cut(&s, "<think>hmm</thi"), [reasoning("hmm")]);
    // A call completed before the cut is kept.
    assert_eq!(
        parse_cut(
            &s,
            "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call><tool_call>{\"na"
        ),
        [call("f", "{}")]
    );
    // Harmony: a call or a header cut short.
    let h = ReplySyntax::of_template("<|start|>{{ x }}<|channel|>final<|message|>");
    for reply in [
        "<|channel|>analysis<|message|>Weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather<|message|>{\"city\": \"Os",
        "<|channel|>analysis<|message|>Weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_we",
        "<|channel|>analysis<|message|>Weather.<|en",
    ] {
        assert_eq!(parse_cut(&h, reply), [reasoning("Weather.")], "{reply}");
    }
}
