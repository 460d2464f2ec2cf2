//! Writing the chosen lexemes and rules as llguidance's Lark: rules lowercase, terminals
//! uppercase (regular rules under their own names, other lexemes as `LEX_n`), literals in JSON
//! string syntax, character classes as `\x{...}`-escaped regular expressions.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use super::charset::CharSet;
use super::parse::{Grammar, Node};
use super::plan::{Lexed, Plan};

pub(super) fn lark(g: &Grammar, lexed: &Lexed) -> String {
    let mut e = Emitter {
        g,
        lexemes: &lexed.lexemes,
        rule_names: HashMap::new(),
        terminal_names: HashMap::new(),
        lexeme_names: HashMap::new(),
        used: HashSet::new(),
        terminals: Vec::new(),
    };
    e.used.insert("start".into());
    let mut out = String::new();
    let mut order: Vec<usize> = vec![g.root];
    order.extend((0..g.rules.len()).filter(|&r| r != g.root));
    for r in order {
        if let Some(plan) = &lexed.plans[r] {
            let name = if r == g.root {
                "start".to_string()
            } else {
                e.rule_name(r)
            };
            let body = match plan {
                Plan::Alt(items) => items
                    .iter()
                    .map(|i| e.plan(i, false))
                    .collect::<Vec<_>>()
                    .join(" | "),
                p => e.plan(p, false),
            };
            let _ = writeln!(out, "{name}: {body}");
        }
    }
    for (name, body) in &e.terminals {
        let _ = writeln!(out, "{name}: {body}");
    }
    out
}

struct Emitter<'a> {
    g: &'a Grammar,
    lexemes: &'a [Node],
    rule_names: HashMap<usize, String>,
    terminal_names: HashMap<usize, String>,
    lexeme_names: HashMap<Node, String>,
    used: HashSet<String>,
    terminals: Vec<(String, String)>,
}

impl Emitter<'_> {
    fn fresh(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut n = 1;
        while self.used.contains(&name) {
            n += 1;
            name = format!("{base}_{n}");
        }
        self.used.insert(name.clone());
        name
    }

    fn rule_name(&mut self, r: usize) -> String {
        if let Some(n) = self.rule_names.get(&r) {
            return n.clone();
        }
        let mut base: String = self.g.rules[r]
            .name
            .chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9') => c,
                _ => '_',
            })
            .collect();
        if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
            base.insert_str(0, "r_");
        }
        let name = self.fresh(base);
        self.rule_names.insert(r, name.clone());
        name
    }

    /// The terminal standing for regular rule `r`, defined on first use.
    fn terminal_name(&mut self, r: usize) -> String {
        if let Some(n) = self.terminal_names.get(&r) {
            return n.clone();
        }
        let mut base: String = self.g.rules[r]
            .name
            .chars()
            .map(|c| match c.to_ascii_uppercase() {
                c @ ('A'..='Z' | '0'..='9') => c,
                _ => '_',
            })
            .collect();
        if !base.starts_with(|c: char| c.is_ascii_uppercase()) {
            base.insert_str(0, "T_");
        }
        let name = self.fresh(base);
        self.terminal_names.insert(r, name.clone());
        // Defined in the order of first use: its slot first, then what it uses.
        let slot = self.terminals.len();
        self.terminals.push((name.clone(), String::new()));
        self.terminals[slot].1 = self.terminal(&self.g.rules[r].body, false);
        name
    }

    /// A node inside a terminal's definition.
    fn terminal(&mut self, n: &Node, nested: bool) -> String {
        match n {
            Node::Empty => "\"\"".into(),
            Node::Lit(chars) => quote(chars),
            Node::Class(set) => class(set),
            Node::Ref(r) => self.terminal_name(*r),
            // Tokens are not regular: never part of a terminal.
            Node::Token { .. } => "\"\"".into(),
            Node::Seq(items) => {
                let s = items
                    .iter()
                    .map(|i| self.terminal(i, true))
                    .collect::<Vec<_>>()
                    .join(" ");
                paren(s, nested)
            }
            Node::Alt(items) => {
                let s = items
                    .iter()
                    .map(|i| self.terminal(i, false))
                    .collect::<Vec<_>>()
                    .join(" | ");
                paren(s, nested)
            }
            Node::Rep(x, min, max) => repeat(self.terminal(x, true), *min, *max),
        }
    }

    /// A lexeme used in a rule: a literal, a class or a terminal.
    fn lexeme(&mut self, id: usize) -> String {
        let node = &self.lexemes[id];
        match node {
            Node::Empty | Node::Lit(_) | Node::Class(_) => self.terminal(node, false),
            Node::Ref(r) => self.terminal_name(*r),
            _ => {
                if let Some(n) = self.lexeme_names.get(node) {
                    return n.clone();
                }
                let name = self.fresh("LEX".into());
                self.lexeme_names.insert(node.clone(), name.clone());
                let slot = self.terminals.len();
                self.terminals.push((name.clone(), String::new()));
                self.terminals[slot].1 = self.terminal(node, false);
                name
            }
        }
    }

    fn plan(&mut self, p: &Plan, nested: bool) -> String {
        match p {
            Plan::Lex(id) => self.lexeme(*id),
            Plan::Token { id, negated } => {
                format!("<[{}{id}]>", if *negated { "^" } else { "" })
            }
            Plan::Rule(r) => self.rule_name(*r),
            Plan::Seq(items) if items.is_empty() => "\"\"".into(),
            Plan::Seq(items) => {
                let s = items
                    .iter()
                    .map(|i| self.plan(i, true))
                    .collect::<Vec<_>>()
                    .join(" ");
                paren(s, nested && items.len() > 1)
            }
            Plan::Alt(items) => {
                let s = items
                    .iter()
                    .map(|i| self.plan(i, false))
                    .collect::<Vec<_>>()
                    .join(" | ");
                paren(s, nested || items.len() > 1)
            }
            Plan::Rep(x, min, max) => repeat(self.plan(x, true), *min, *max),
        }
    }
}

fn paren(s: String, yes: bool) -> String {
    if yes {
        format!("({s})")
    } else {
        s
    }
}

fn repeat(atom: String, min: u32, max: Option<u32>) -> String {
    // A repetition of a repetition needs parentheses.
    let atom = if atom.ends_with(['*', '+', '?', '}']) {
        format!("({atom})")
    } else {
        atom
    };
    match (min, max) {
        (_, Some(0)) => "\"\"".into(),
        (0, None) => format!("{atom}*"),
        (1, None) => format!("{atom}+"),
        (0, Some(1)) => format!("{atom}?"),
        (1, Some(1)) => atom,
        (m, None) => format!("{atom}{{{m},}}"),
        (m, Some(n)) if m == n => format!("{atom}{{{m}}}"),
        (m, Some(n)) => format!("{atom}{{{m},{n}}}"),
    }
}

/// A Lark string literal (JSON syntax, as llguidance reads it).
fn quote(chars: &[char]) -> String {
    let mut s = String::from("\"");
    for &c in chars {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// A one-character regular expression.
fn class(set: &CharSet) -> String {
    if *set == CharSet::any() {
        return "/(?s:.)/".into();
    }
    let one = |c: u32| match char::from_u32(c) {
        Some(ch) if ch.is_ascii_alphanumeric() => ch.to_string(),
        _ => format!("\\x{{{c:X}}}"),
    };
    let mut s = String::from("/[");
    for &(lo, hi) in set.ranges() {
        s.push_str(&one(lo));
        if hi > lo {
            s.push('-');
            s.push_str(&one(hi));
        }
    }
    s.push_str("]/");
    s
}
