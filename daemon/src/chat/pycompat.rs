//! What chat templates written for transformers' Jinja environment need beyond minijinja and its
//! `pycompat` string methods: transformers' `tojson` (Python's `json.dumps`, not HTML-escaped,
//! with `ensure_ascii`, `indent`, `separators`, `sort_keys`), `strftime_now`, lists that
//! `namespace` holds and templates mutate (`append`, `pop`), and the `{% generation %}` tag of
//! transformers' assistant masks (rendered as its content).

use std::fmt::Write;
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

/// Adds the functions and filters to `env`.
pub fn install(env: &mut Environment<'static>) {
    env.add_filter("tojson", tojson);
    env.add_function("strftime_now", strftime_now);
    env.add_function("namespace", namespace);
}

/// The template's source with transformers-only tags removed: `{% generation %}` and
/// `{% endgeneration %}` only mark the assistant's text for training masks.
pub fn preprocess(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let tag_end = match rest[start..].find("%}") {
            Some(e) => start + e + 2,
            None => break,
        };
        let inner =
            rest[start + 2..tag_end - 2].trim_matches(|c: char| c == '-' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[start..tag_end]);
        }
        rest = &rest[tag_end..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` by default.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_i64() {
            Some(n) => " ".repeat(n.max(0) as usize),
            None => v.as_str().map(str::to_string).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent is a number or a string",
                )
            })?,
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators is a pair",
            ))
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let mut out = String::new();
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    style.write(&mut out, &value, 0)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match v.as_i64() {
                Some(i) if v.is_integer() => {
                    let _ = write!(out, "{i}");
                }
                _ => out.push_str(&python_float(f64::try_from(v.clone()).unwrap_or(f64::NAN))),
            },
            ValueKind::String => self.string(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, '[', ']', items.len(), depth, |out, i, d| {
                    self.write(out, &items[i], d)
                })?;
            }
            ValueKind::Map => {
                let mut pairs: Vec<(Value, Value)> = match v.as_object() {
                    Some(o) => o
                        .try_iter_pairs()
                        .map(|it| it.collect())
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                if self.sort_keys {
                    pairs.sort_by_key(|p| p.0.to_string());
                }
                self.container(out, '{', '}', pairs.len(), depth, |out, i, d| {
                    let (k, val) = &pairs[i];
                    match k.as_str() {
                        Some(s) => self.string(out, s),
                        None => self.string(out, &k.to_string()),
                    }
                    out.push_str(&self.key_sep);
                    self.write(out, val, d)
                })?;
            }
            _ => self.string(out, &v.to_string()),
        }
        Ok(())
    }

    fn container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        n: usize,
        depth: usize,
        mut item: impl FnMut(&mut String, usize, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if n == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..n {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(ind) = &self.indent {
                out.push('\n');
                out.push_str(&ind.repeat(depth + 1));
            }
            item(out, i, depth + 1)?;
        }
        if let Some(ind) = &self.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` as `json.dumps` writes it.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Rust writes 1e-5 or 1.5e16; Python 1e-05 and 1.5e+16.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    if f.fract() == 0.0 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// The local time formatted by C's `strftime`, as Python's `datetime.now().strftime` does.
fn strftime_now(format: String) -> Result<Value, Error> {
    use nix::libc;
    let fmt = std::ffi::CString::new(format)
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "strftime_now: NUL in format"))?;
    let mut buf = vec![0u8; 256];
    // SAFETY: `time`, `localtime_r` and `strftime` get valid pointers to local values; `strftime`
    // writes at most `buf.len()` bytes and returns how many.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: no local time",
            ));
        }
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm)
    };
    buf.truncate(n);
    Ok(Value::from(String::from_utf8_lossy(&buf).into_owned()))
}

/// `namespace(...)` whose list values templates can `append` to and `pop` from, as in Python.
fn namespace(defaults: Option<Value>) -> Result<Value, Error> {
    let Some(defaults) = defaults else {
        return minijinja::functions::namespace(None);
    };
    let pairs: Vec<(Value, Value)> = match defaults.as_object().and_then(|o| o.try_iter_pairs()) {
        Some(it) => it.collect(),
        None => return minijinja::functions::namespace(Some(defaults)),
    };
    let map: Vec<(Value, Value)> = pairs
        .into_iter()
        .map(|(k, v)| {
            let v = if v.kind() == ValueKind::Seq
                && v.as_object()
                    .is_none_or(|o| o.downcast_ref::<MutableList>().is_none())
            {
                Value::from_object(MutableList(Mutex::new(
                    v.try_iter().map(|it| it.collect()).unwrap_or_default(),
                )))
            } else {
                v
            };
            (k, v)
        })
        .collect();
    minijinja::functions::namespace(Some(Value::from_iter(map)))
}

/// A list a template mutates.
#[derive(Debug)]
struct MutableList(Mutex<Vec<Value>>);

impl MutableList {
    fn items(&self) -> std::sync::MutexGuard<'_, Vec<Value>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Object for MutableList {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let items = self.items();
        let i = key.as_i64()?;
        let i = if i < 0 { items.len() as i64 + i } else { i };
        items.get(usize::try_from(i).ok()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.items().len())
    }

    fn call_method(
        self: &Arc<Self>,
        _state: &State<'_, '_>,
        method: &str,
        args: &[Value],
    ) -> Result<Value, Error> {
        let mut items = self.items();
        match (method, args) {
            ("append", [v]) => {
                items.push(v.clone());
                Ok(Value::from(()))
            }
            ("pop", []) => items
                .pop()
                .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "pop from empty list")),
            ("pop", [i]) => {
                let i = i.as_i64().unwrap_or(-1);
                let i = if i < 0 { items.len() as i64 + i } else { i };
                match usize::try_from(i).ok().filter(|&i| i < items.len()) {
                    Some(i) => Ok(items.remove(i)),
                    None => Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "pop index out of range",
                    )),
                }
            }
            ("extend", [v]) => {
                items.extend(v.try_iter()?);
                Ok(Value::from(()))
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    fn render(src: &str, ctx: Value) -> String {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        install(&mut env);
        env.add_template_owned("t", preprocess(src)).unwrap();
        env.get_template("t").unwrap().render(ctx).unwrap()
    }

    #[test]
    fn tojson_as_python_json_dumps() {
        let v = Value::from_serialize(
            serde_json::json!({"b": [1, 2.5, 3.0, null, true], "a": "é\n\"x\""}),
        );
        // Keys stay in the order they were written.
        assert_eq!(
            render("{{ v | tojson }}", context! { v => v.clone() }),
            r#"{"b": [1, 2.5, 3.0, null, true], "a": "é\n\"x\""}"#
        );
        assert_eq!(
            render(
                "{{ v | tojson(ensure_ascii=True) }}",
                context! { v => "é🐳" }
            ),
            r#""\u00e9\ud83d\udc33""#
        );
        assert_eq!(
            render("{{ v | tojson(indent=2) }}", context! { v => v.clone() }),
            "{\n  \"b\": [\n    1,\n    2.5,\n    3.0,\n    null,\n    true\n  ],\n  \"a\": \"é\\n\\\"x\\\"\"\n}"
        );
        assert_eq!(
            render(
                "{{ v | tojson(separators=(',', ':'), sort_keys=True) }}",
                context! { v => v }
            ),
            r#"{"a":"é\n\"x\"","b":[1,2.5,3.0,null,true]}"#
        );
        assert_eq!(python_float(1e-5), "1e-05");
        assert_eq!(python_float(1.5e16), "1.5e+16");
        assert_eq!(python_float(-0.25), "-0.25");
    }

    #[test]
    fn namespace_lists_are_mutable_and_generation_tags_vanish() {
        let src = "{%- set q = namespace(ids=[]) -%}{%- for x in ['a', 'b', 'c'] -%}{%- set _ = q.ids.append(x) -%}{%- endfor -%}{{ q.ids.pop(0) }}{{ q.ids | length }}{% generation %}{{ q.ids[0] }}{%- endgeneration %}";
        assert_eq!(render(src, context! {}), "a2b");
        let year = render("{{ strftime_now('%Y') }}", context! {});
        assert!(year.len() == 4 && year.starts_with('2'), "{year}");
    }
}
