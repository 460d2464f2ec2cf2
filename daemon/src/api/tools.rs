//! `tools`, `tool_choice` and `parallel_tool_calls`: their validation, and what they ask of the
//! reply.

use serde_json::Value;

use super::error::ApiError;

/// What the request asks of the model's tool calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolUse {
    /// No tools: none given, or `tool_choice: "none"` (they are then not shown to the model
    /// and calls are not parsed out of the reply).
    None,
    /// The model answers in text, calls tools, or both (`"auto"`, the default with tools).
    Auto,
    /// At least one call, nothing else (`"required"`).
    Required,
    /// One call to this function (`{"type": "function", "function": {"name": ...}}`).
    Function(String),
}

impl ToolUse {
    /// Whether calls are forced (the tool-call grammar holds the reply).
    pub fn is_forced(&self) -> bool {
        matches!(self, Self::Required | Self::Function(_))
    }
}

/// The tools of a request: `[{"type": "function", "function": {"name", "parameters"}}]`.
fn tool_list(tools: Option<&Value>) -> Result<&[Value], ApiError> {
    let Some(tools) = tools.filter(|t| !t.is_null()) else {
        return Ok(&[]);
    };
    let Some(list) = tools.as_array() else {
        return Err(ApiError::param("tools", "`tools` must be an array"));
    };
    for (i, t) in list.iter().enumerate() {
        let function = t.get("function");
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        if t.get("type").and_then(Value::as_str) != Some("function") || name.is_none() {
            return Err(ApiError::param(
                &format!("tools[{i}]"),
                "a tool must be `{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}`",
            ));
        }
        if function
            .and_then(|f| f.get("parameters"))
            .is_some_and(|s| !s.is_object() && !s.is_null())
        {
            return Err(ApiError::param(
                &format!("tools[{i}].function.parameters"),
                "a tool's `parameters` must be a JSON schema object",
            ));
        }
    }
    Ok(list)
}

/// What `tools` and `tool_choice` ask for.
pub fn tool_use(tools: Option<&Value>, tool_choice: Option<&Value>) -> Result<ToolUse, ApiError> {
    const TC: &str = "tool_choice";
    let tools = tool_list(tools)?;
    let bad = |why: &str| Err(ApiError::param(TC, why.to_string()));
    let choice = match tool_choice.filter(|c| !c.is_null()) {
        None if tools.is_empty() => return Ok(ToolUse::None),
        None => ToolUse::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolUse::None,
            "auto" => ToolUse::Auto,
            "required" => ToolUse::Required,
            other => {
                return bad(&format!(
                    "`tool_choice` `{other}` is not one of none, auto, required or \
                     {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                ))
            }
        },
        Some(v @ Value::Object(_)) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (v.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => ToolUse::Function(name.to_string()),
                _ => {
                    return bad(
                        "`tool_choice` as an object is {\"type\": \"function\", \"function\": \
                         {\"name\": ...}}",
                    )
                }
            }
        }
        Some(_) => return bad("`tool_choice` must be a string or an object"),
    };
    match &choice {
        // Some clients send `auto` whatever the tools (llama.cpp's server accepts it too).
        ToolUse::Auto if tools.is_empty() => Ok(ToolUse::None),
        ToolUse::Required if tools.is_empty() => {
            bad("`tool_choice` asks for tool calls, but `tools` is empty")
        }
        ToolUse::Function(name) if !tools.iter().any(|t| tool_name(t) == Some(name)) => bad(
            &format!("`tool_choice` names `{name}`, which is not one of `tools`"),
        ),
        _ => Ok(choice),
    }
}

fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("function")?.get("name")?.as_str()
}

/// The tools `tool_use` allows a call to: each one's name and `parameters` (null when it has
/// none).
pub fn allowed_tools(tools: Option<&Value>, tool_use: &ToolUse) -> Vec<(String, Value)> {
    let tools = tool_list(tools).unwrap_or_default();
    tools
        .iter()
        .filter_map(|t| {
            let name = tool_name(t)?;
            if let ToolUse::Function(only) = tool_use {
                if only != name {
                    return None;
                }
            }
            let params = t["function"]
                .get("parameters")
                .cloned()
                .unwrap_or(Value::Null);
            Some((name.to_string(), params))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_body;
    use serde_json::json;

    fn tool_use_of(body: &str) -> Result<ToolUse, ApiError> {
        let p = parse_body(body.as_bytes()).unwrap();
        tool_use(p.tools.as_ref(), p.tool_choice.as_ref())
    }

    const TOOLS: &str = r#""tools": [{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "g"}}]"#;

    #[test]
    fn tool_choice() {
        let with = |choice: &str| tool_use_of(&format!("{{{TOOLS}, \"tool_choice\": {choice}}}"));
        assert_eq!(tool_use_of("{}").unwrap(), ToolUse::None);
        assert_eq!(tool_use_of(&format!("{{{TOOLS}}}")).unwrap(), ToolUse::Auto);
        assert_eq!(with("\"none\"").unwrap(), ToolUse::None);
        assert_eq!(with("\"auto\"").unwrap(), ToolUse::Auto);
        assert_eq!(with("\"required\"").unwrap(), ToolUse::Required);
        assert_eq!(
            tool_use_of(r#"{"tool_choice": "auto"}"#).unwrap(),
            ToolUse::None
        );
        assert_eq!(
            with(r#"{"type": "function", "function": {"name": "g"}}"#).unwrap(),
            ToolUse::Function("g".into())
        );
        for bad in [
            "\"always\"",
            "3",
            r#"{"type": "function"}"#,
            r#"{"type": "function", "function": {"name": "h"}}"#,
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("tool_choice"), "{bad}");
        }
        let e = tool_use_of(r#"{"tool_choice": "required"}"#).unwrap_err();
        assert!(e.message.contains("`tools` is empty"), "{}", e.message);
        let e = tool_use_of(
            r#"{"tools": [{"type": "function", "function": {"name": "f",
            "parameters": 3}}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.parameters"));
        let e = tool_use_of(r#"{"tools": [{"type": "function"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0]"));
    }

    #[test]
    fn allowed_tools_follow_the_choice() {
        let p = parse_body(format!("{{{TOOLS}}}").as_bytes()).unwrap();
        let all = allowed_tools(p.tools.as_ref(), &ToolUse::Required);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, "f");
        assert_eq!(all[0].1["properties"]["x"], json!({"type": "integer"}));
        assert_eq!((all[1].0.as_str(), &all[1].1), ("g", &Value::Null));
        let one = allowed_tools(p.tools.as_ref(), &ToolUse::Function("g".into()));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0, "g");
    }
}
