//! What a generation request becomes before it is queued: the prompt's token ids (a completion
//! prompt, or the chat messages through the model's template), the grammar the output must
//! match (compiled for the model's vocabulary), and for chat how the reply is parsed. CPU work,
//! run off the I/O thread.

use hyper::StatusCode;
use moe_runtime::grammar::{Constraint, Grammar, ToolCallGrammar, ToolChoice};
use serde_json::Value;

use crate::api::{self, ApiError, Endpoint, GenParams, ToolUse, Validated};
use crate::reply::{self, ReplySyntax, ToolSyntax};
use crate::worker::Loaded;

/// Bytes of the rendered chat prompt the reply parser looks at (whether the template left a
/// reasoning block open).
const PROMPT_TAIL: usize = 64;

pub struct Prepared {
    pub prompt: Vec<u32>,
    pub constraint: Option<Constraint>,
    /// Chat: how the reply is marked up, and the end of the prompt it follows.
    pub reply: Option<(ReplySyntax, String)>,
}

impl Prepared {
    /// Whether special tokens stay in the generated text (the reply parser reads markers that
    /// some models write as special tokens).
    pub fn keep_special(&self) -> bool {
        self.reply.as_ref().is_some_and(|(s, _)| !s.is_plain())
    }
}

pub fn prepare(
    p: &GenParams,
    v: &Validated,
    endpoint: Endpoint,
    l: &Loaded,
) -> Result<Prepared, ApiError> {
    let (prompt, reply) = match endpoint {
        Endpoint::Completions => (completion_prompt(p, l)?, None),
        Endpoint::Chat => {
            let (ids, text) = chat_prompt(p, v, l)?;
            let mut syntax = l.reply.clone();
            if v.tool_use == ToolUse::None {
                syntax.tools = ToolSyntax::None;
            }
            let mut at = text.len().saturating_sub(PROMPT_TAIL);
            while !text.is_char_boundary(at) {
                at += 1;
            }
            (ids, Some((syntax, text[at..].to_string())))
        }
    };
    let wanted = match &reply {
        Some((syntax, tail)) if v.tool_use.is_forced() => Some((
            Wanted::Tools(tool_grammar(p, v, syntax, tail)?),
            "tool_choice",
        )),
        // `auto`: text, or calls held to the tools' schemas once the model starts one (when
        // no other grammar is asked for).
        Some((syntax, tail)) if v.tool_use == ToolUse::Auto && v.grammar.is_none() => {
            auto_grammar(p, v, syntax, tail).map(|g| (Wanted::Tools(g), "tools"))
        }
        _ => v
            .grammar
            .clone()
            .map(|(g, param)| (Wanted::Grammar(g), param)),
    };
    let auto = wanted.as_ref().is_some_and(|(_, param)| *param == "tools");
    let constraint = match wanted {
        None => None,
        Some((g, param)) => {
            let compiled = compile(g, param, l);
            match compiled {
                // A tool schema llguidance cannot take leaves an `auto` reply unconstrained
                // (it is parsed all the same), as before tools were constrained.
                Err(e) if auto => {
                    tracing::debug!(error = %e.message, "tool calls left unconstrained");
                    None
                }
                c => Some(c?),
            }
        }
    };
    Ok(Prepared {
        prompt,
        constraint,
        reply,
    })
}

/// `g` compiled for the model's vocabulary; errors name `param`.
fn compile(g: Wanted, param: &str, l: &Loaded) -> Result<Constraint, ApiError> {
    let vocab = l.grammar_vocab().map_err(|e| {
        ApiError::param(
            param,
            format!("this model's vocabulary cannot be used for grammars: {e}"),
        )
    })?;
    let g = match g {
        Wanted::Grammar(g) => g,
        Wanted::Tools(t) => Grammar::Lark(
            t.to_lark(vocab)
                .map_err(|e| ApiError::param(param, format!("`tools`: {e}")))?,
        ),
    };
    vocab
        .compile(&g)
        .map_err(|e| ApiError::param(param, format!("`{param}`: {e}")))
}

/// The grammar of `tool_choice: "auto"`: free text, and calls in the family's syntax whose
/// arguments follow the tools' schemas (None: the family's calls cannot be written by a
/// grammar, so the reply is only parsed).
fn auto_grammar(
    p: &GenParams,
    v: &Validated,
    syntax: &ReplySyntax,
    prompt_tail: &str,
) -> Option<ToolCallGrammar> {
    let tools = api::allowed_tools(p.tools.as_ref(), &v.tool_use);
    reply::tool_call_grammar(
        syntax.form,
        syntax,
        &tools,
        ToolChoice::Auto,
        p.parallel_tool_calls.unwrap_or(true),
        reply::Reasoning::after(syntax, prompt_tail),
    )
}

/// A grammar asked for directly, or the tool-call grammar for a forced call.
enum Wanted {
    Grammar(Grammar),
    Tools(ToolCallGrammar),
}

/// The grammar that makes the model call one of the tools `tool_choice` allows, in its
/// family's syntax, after the reasoning block the prompt (ending with `prompt_tail`) may have
/// opened.
fn tool_grammar(
    p: &GenParams,
    v: &Validated,
    syntax: &ReplySyntax,
    prompt_tail: &str,
) -> Result<ToolCallGrammar, ApiError> {
    if let Some((_, param)) = &v.grammar {
        return Err(ApiError::param(
            param,
            format!("`{param}` cannot be combined with a forced tool call (`tool_choice`)"),
        ));
    }
    let named = matches!(v.tool_use, ToolUse::Function(_));
    let tools = api::allowed_tools(p.tools.as_ref(), &v.tool_use);
    reply::tool_call_grammar(
        syntax.form,
        syntax,
        &tools,
        ToolChoice::Required,
        !named && p.parallel_tool_calls.unwrap_or(true),
        reply::Reasoning::after(syntax, prompt_tail),
    )
    .ok_or_else(|| {
        ApiError::param(
            "tool_choice",
            "this model's chat template has no tool-call format moed knows (Hermes/Qwen \
             <tool_call>, Qwen3-Coder XML, GLM, DeepSeek, Kimi-K2, Mistral, Granite, LFM2, \
             gpt-oss), so calls cannot be forced: use `tool_choice: \"auto\"`",
        )
    })
}

/// The prompt of a completion request as token ids.
fn completion_prompt(p: &GenParams, l: &Loaded) -> Result<Vec<u32>, ApiError> {
    let bad = || {
        ApiError::param(
            "prompt",
            "`prompt` must be a string, an array holding one string, or an array of token ids",
        )
    };
    let one = || ApiError::param("prompt", "moed takes one prompt per request");
    let ids_of = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&t| (t as usize) < l.n_vocab)
                    .map(|t| t as u32)
                    .ok_or_else(|| {
                        ApiError::param(
                            "prompt",
                            format!(
                                "token ids must be integers below the vocabulary size {}",
                                l.n_vocab
                            ),
                        )
                    })
            })
            .collect()
    };
    let encode = |text: &str| {
        l.tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::param("prompt", e.to_string()))
    };
    let ids = match &p.prompt {
        None | Some(Value::Null) => return Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Value::String(s)) => encode(s)?,
        Some(Value::Array(items)) => match items.first() {
            None => Vec::new(),
            Some(Value::String(_)) if items.len() > 1 => return Err(one()),
            Some(Value::String(s)) => encode(s)?,
            Some(Value::Number(_)) => ids_of(items)?,
            Some(Value::Array(_)) if items.len() > 1 => return Err(one()),
            Some(Value::Array(inner)) => ids_of(inner)?,
            Some(_) => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    empty_to_bos(ids, l, "prompt")
}

fn empty_to_bos(ids: Vec<u32>, l: &Loaded, param: &str) -> Result<Vec<u32>, ApiError> {
    if !ids.is_empty() {
        return Ok(ids);
    }
    match l.tokenizer.bos() {
        Some(b) => Ok(vec![b]),
        None => Err(ApiError::param(param, "the prompt is empty")),
    }
}

/// The chat prompt: messages through the model's template (without the tools when
/// `tool_choice` is `none`), then token ids (no special tokens added: the template writes
/// them, as with transformers' `apply_chat_template`); and the rendered text.
fn chat_prompt(p: &GenParams, v: &Validated, l: &Loaded) -> Result<(Vec<u32>, String), ApiError> {
    let template = l.chat.as_ref().map_err(|why| {
        ApiError::status(StatusCode::NOT_IMPLEMENTED, why.clone()).with_code("no_chat_template")
    })?;
    let messages = p
        .messages
        .as_deref()
        .ok_or_else(|| ApiError::param("messages", "`messages` is required"))?;
    let mut opts = crate::chat::render_options(p)?;
    if v.tool_use == ToolUse::None {
        opts.tools = None;
    }
    let text = template.render(messages, &opts)?;
    let ids = l
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    Ok((empty_to_bos(ids, l, "messages")?, text))
}
