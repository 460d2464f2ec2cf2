//! GBNF text to rules, following llama.cpp's parser (`src/llama-grammar.cpp`): rule names of
//! letters, digits and `-` (and `_`), `#` comments, newlines inside groups and after `|`,
//! literals and character classes with `\x` `\u` `\U` `\t` `\r` `\n` `\\` `\"` `\[` `\]` `\-`
//! escapes, `.`, `* + ? {m} {m,} {m,n}` (bounds over 2000 rejected, or unbounded for a maximum,
//! as there), and tokens `<[id]>`, `<text>` and their negations `!<...>`.

use std::collections::HashMap;

use super::charset::CharSet;
use super::{GbnfError, TokenNames};

/// llama.cpp's `MAX_REPETITION_THRESHOLD`.
const MAX_REPETITION: u64 = 2000;

/// A grammar expression over characters (and tokens).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Node {
    /// The empty string.
    Empty,
    /// A non-empty literal.
    Lit(Vec<char>),
    /// One character of a non-empty set.
    Class(CharSet),
    /// One token (`negated`: any token but this one).
    Token {
        id: u32,
        negated: bool,
    },
    /// Another rule, by index.
    Ref(usize),
    Seq(Vec<Node>),
    Alt(Vec<Node>),
    /// Between `min` and `max` (None: unbounded) repetitions.
    Rep(Box<Node>, u32, Option<u32>),
}

pub(super) struct Rule {
    pub name: String,
    pub body: Node,
}

pub(super) struct Grammar {
    pub rules: Vec<Rule>,
    pub root: usize,
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    tokens: &'a dyn TokenNames,
    ids: HashMap<String, usize>,
    /// Per rule: its body once defined, and where it was first referenced.
    bodies: Vec<Option<Node>>,
    first_use: Vec<usize>,
    names: Vec<String>,
}

pub(super) fn parse(src: &str, tokens: &dyn TokenNames) -> Result<Grammar, GbnfError> {
    let mut p = Parser {
        src,
        pos: 0,
        tokens,
        ids: HashMap::new(),
        bodies: Vec::new(),
        first_use: Vec::new(),
        names: Vec::new(),
    };
    p.skip_space(true);
    while p.peek().is_some() {
        p.rule()?;
    }
    for (i, body) in p.bodies.iter().enumerate() {
        if body.is_none() {
            return Err(p.error_at(p.first_use[i], format!("undefined rule `{}`", p.names[i])));
        }
    }
    let Some(&root) = p.ids.get("root") else {
        return Err(p.error_at(src.len(), "the grammar has no `root` rule"));
    };
    let rules = p
        .names
        .into_iter()
        .zip(p.bodies)
        .map(|(name, body)| Rule {
            name,
            body: body.unwrap_or(Node::Empty),
        })
        .collect();
    Ok(Grammar { rules, root })
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.src[self.pos..].chars().nth(n)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn error_at(&self, pos: usize, message: impl Into<String>) -> GbnfError {
        let before = &self.src[..pos.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        GbnfError {
            line,
            column,
            message: message.into(),
        }
    }

    fn error(&self, message: impl Into<String>) -> GbnfError {
        self.error_at(self.pos, message)
    }

    /// Spaces, tabs and `#` comments; newlines too where a rule may continue.
    fn skip_space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '\r' | '\n' if newlines => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\r' && c != '\n') {
                        self.bump();
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Result<String, GbnfError> {
        let start = self.pos;
        while self.peek().is_some_and(is_word_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expected a rule name"));
        }
        Ok(self.src[start..self.pos].to_string())
    }

    fn rule_id(&mut self, name: &str, at: usize) -> usize {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len();
        self.ids.insert(name.to_string(), id);
        self.names.push(name.to_string());
        self.bodies.push(None);
        self.first_use.push(at);
        id
    }

    fn rule(&mut self) -> Result<(), GbnfError> {
        let at = self.pos;
        let name = self.name()?;
        self.skip_space(false);
        if !self.src[self.pos..].starts_with("::=") {
            return Err(self.error("expected `::=`"));
        }
        self.pos += 3;
        self.skip_space(true);
        let body = self.alternates(false)?;
        match self.peek() {
            Some('\r') => {
                self.pos += 1;
                if self.peek() == Some('\n') {
                    self.pos += 1;
                }
            }
            Some('\n') => self.pos += 1,
            None => {}
            Some(c) => return Err(self.error(format!("unexpected `{c}`"))),
        }
        self.skip_space(true);
        let id = self.rule_id(&name, at);
        // A later definition replaces an earlier one, as in llama.cpp.
        self.bodies[id] = Some(body);
        Ok(())
    }

    fn alternates(&mut self, nested: bool) -> Result<Node, GbnfError> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some('|') {
            self.pos += 1;
            self.skip_space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(if alts.len() == 1 {
            alts.pop().unwrap_or(Node::Empty)
        } else {
            Node::Alt(alts)
        })
    }

    fn sequence(&mut self, nested: bool) -> Result<Node, GbnfError> {
        let mut items: Vec<Node> = Vec::new();
        while let Some(c) = self.peek() {
            let item = match c {
                '"' => {
                    self.pos += 1;
                    let mut chars = Vec::new();
                    loop {
                        match self.peek() {
                            None => return Err(self.error("unterminated literal")),
                            Some('"') => break,
                            Some(_) => chars.push(self.char()?),
                        }
                    }
                    self.pos += 1;
                    if chars.is_empty() {
                        Node::Empty
                    } else {
                        Node::Lit(chars)
                    }
                }
                '[' => self.class()?,
                '<' | '!' => self.token()?,
                '(' => {
                    self.pos += 1;
                    self.skip_space(true);
                    let inner = self.alternates(true)?;
                    if self.peek() != Some(')') {
                        return Err(self.error("expected `)`"));
                    }
                    self.pos += 1;
                    inner
                }
                '.' => {
                    self.pos += 1;
                    Node::Class(CharSet::any())
                }
                '*' | '+' | '?' | '{' => {
                    let (min, max) = self.repetition()?;
                    let Some(last) = items.pop() else {
                        return Err(self.error(format!("`{c}` follows nothing")));
                    };
                    let node = Node::Rep(Box::new(last), min, max);
                    self.skip_space(nested);
                    items.push(node);
                    continue;
                }
                c if is_word_char(c) => {
                    let at = self.pos;
                    let name = self.name()?;
                    Node::Ref(self.rule_id(&name, at))
                }
                _ => break,
            };
            items.push(item);
            self.skip_space(nested);
        }
        Ok(match items.len() {
            0 => Node::Empty,
            1 => items.pop().unwrap_or(Node::Empty),
            _ => Node::Seq(items),
        })
    }

    /// `*`, `+`, `?`, `{m}`, `{m,}` or `{m,n}`.
    fn repetition(&mut self) -> Result<(u32, Option<u32>), GbnfError> {
        let c = self.bump();
        let (min, max) = match c {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            _ => {
                self.skip_space(true);
                let min = self.int()?;
                self.skip_space(true);
                let max = match self.bump() {
                    Some('}') => Some(min),
                    Some(',') => {
                        self.skip_space(true);
                        let max = if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                            Some(self.int()?)
                        } else {
                            None
                        };
                        self.skip_space(true);
                        if self.bump() != Some('}') {
                            return Err(self.error("expected `}`"));
                        }
                        max
                    }
                    _ => return Err(self.error("expected `,` or `}`")),
                };
                if min > MAX_REPETITION {
                    return Err(self.error(format!(
                        "at most {MAX_REPETITION} repetitions, got {min} (as llama.cpp)"
                    )));
                }
                if max.is_some_and(|max| max < min) {
                    return Err(self.error("the maximum repetition is below the minimum"));
                }
                // llama.cpp treats a larger maximum as none.
                (min, max.filter(|&m| m <= MAX_REPETITION))
            }
        };
        Ok((min as u32, max.map(|m| m as u32)))
    }

    fn int(&mut self) -> Result<u64, GbnfError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.src[start..self.pos]
            .parse()
            .map_err(|_| self.error_at(start, "expected a number"))
    }

    /// One character of a literal or class, escapes decoded.
    fn char(&mut self) -> Result<char, GbnfError> {
        let at = self.pos;
        let Some(c) = self.bump() else {
            return Err(self.error("unexpected end of the grammar"));
        };
        if c != '\\' {
            return Ok(c);
        }
        let hex = |p: &mut Self, n: usize| -> Result<char, GbnfError> {
            let digits = p.src.get(p.pos..p.pos + n).unwrap_or("");
            let value = (digits.len() == n && digits.chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(digits, 16).ok())
                .flatten()
                .ok_or_else(|| p.error_at(at, format!("expected {n} hexadecimal digits")))?;
            p.pos += n;
            char::from_u32(value)
                .ok_or_else(|| p.error_at(at, format!("U+{value:X} is not a character")))
        };
        match self.bump() {
            Some('x') => hex(self, 2),
            Some('u') => hex(self, 4),
            Some('U') => hex(self, 8),
            Some('t') => Ok('\t'),
            Some('r') => Ok('\r'),
            Some('n') => Ok('\n'),
            Some(c @ ('\\' | '"' | '[' | ']' | '-')) => Ok(c),
            Some(c) => Err(self.error_at(at, format!("unknown escape `\\{c}`"))),
            None => Err(self.error("unexpected end of the grammar")),
        }
    }

    fn class(&mut self) -> Result<Node, GbnfError> {
        let at = self.pos;
        self.pos += 1;
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
        }
        let mut ranges = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated character class")),
                Some(']') => break,
                Some(_) => {}
            }
            let lo = self.char()?;
            let mut hi = lo;
            if self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c != ']') {
                self.pos += 1;
                hi = self.char()?;
            }
            ranges.push((lo as u32, hi as u32));
        }
        self.pos += 1;
        let mut set = CharSet::from_ranges(ranges);
        if negated {
            set = set.complement();
        }
        if set.is_empty() {
            return Err(self.error_at(at, "the character class matches nothing"));
        }
        Ok(Node::Class(set))
    }

    /// `<[id]>`, `<text>` (a text the vocabulary has as one token), with `!` before: any other
    /// token.
    fn token(&mut self) -> Result<Node, GbnfError> {
        let at = self.pos;
        let negated = self.peek() == Some('!');
        if negated {
            self.pos += 1;
        }
        if self.peek() != Some('<') {
            return Err(self.error("expected `<` after `!`"));
        }
        let start = self.pos;
        let Some(len) = self.src[start..].find('>') else {
            return Err(self.error("unterminated token: expected `>`"));
        };
        let text = &self.src[start..start + len + 1];
        self.pos = start + len + 1;
        let n_vocab = self.tokens.n_vocab();
        let id = match text.strip_prefix("<[").and_then(|t| t.strip_suffix("]>")) {
            Some(digits) => digits
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < n_vocab)
                .ok_or_else(|| {
                    self.error_at(
                        at,
                        format!("{text} is not a token id below the vocabulary size {n_vocab}"),
                    )
                })?,
            None => self.tokens.token_id(text).ok_or_else(|| {
                self.error_at(
                    at,
                    format!("{text} is not one token of the model's vocabulary"),
                )
            })?,
        };
        Ok(Node::Token { id, negated })
    }
}
