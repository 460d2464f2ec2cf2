//! Which parts of a GBNF grammar become llguidance lexemes.
//!
//! llguidance splits text into lexemes (terminals, compiled to one regular expression each) and
//! parses lexemes with an Earley parser; its lexer is greedy (the longest match of any lexeme
//! the parser allows). GBNF has no lexer: llama.cpp matches character by character and keeps
//! every parse. A grammar made only of one-character lexemes keeps GBNF's language exactly but
//! is slow; large lexemes are fast, but greedy matching can cut the text differently from the
//! only parse, and reject text GBNF accepts (`w ::= [a-z]+` followed by `"ing"` never ends `w`
//! before the `ing`).
//!
//! So the conversion starts from the largest lexemes (rules without recursion or tokens become
//! terminals; runs of such items in a sequence, and such alternatives, merge into one) and splits
//! a lexeme whenever greedy matching could overshoot where it must end: a lexeme whose complete
//! match could go on with a character that may follow it, or another lexeme allowed at the same
//! place that could swallow such a character after matching the same text. The character sets
//! are over-approximated (never missing a conflict), so what is left cuts text as GBNF does;
//! in the worst case lexemes are single characters.

use super::charset::CharSet;
use super::parse::{Grammar, Node};
use super::plan::{Lexed, Plan};
use super::GbnfError;

/// Above this many lexemes the grammar is refused (splitting inlines rules).
const MAX_LEXEMES: usize = 100_000;

/// A regular expression's characters, over-approximated.
#[derive(Clone, Debug, Default)]
struct Props {
    /// Characters a match can start with.
    first: CharSet,
    /// Characters at the second position or later of some match.
    tail: CharSet,
    /// Characters that can extend a complete match into the prefix of another (for an
    /// expression matching the empty string: its first characters too).
    cont: CharSet,
    nullable: bool,
    nonempty: bool,
}

impl Props {
    fn empty() -> Self {
        Self {
            nullable: true,
            ..Self::default()
        }
    }

    /// What `cont` can be at most: any character after the first, or (matching the empty
    /// string) a first one.
    fn widest_cont(&self) -> CharSet {
        if self.nullable {
            self.tail.union(&self.first)
        } else {
            self.tail.clone()
        }
    }

    fn then(&self, y: &Props) -> Props {
        let mut p = Props {
            first: self.first.clone(),
            tail: self.tail.union(&y.tail),
            cont: CharSet::empty(),
            nullable: self.nullable && y.nullable,
            nonempty: self.nonempty || y.nonempty,
        };
        if self.nullable {
            p.first.add(&y.first);
        }
        if self.nonempty {
            p.tail.add(&y.first);
        }
        p.cont = if self.cont.intersects(&y.first) {
            // Where the first part ends is ambiguous.
            p.widest_cont()
        } else if y.nullable {
            y.cont.union(&self.cont)
        } else {
            y.cont.clone()
        };
        p
    }
}

/// A set of lexeme ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn one(i: usize) -> Self {
        let mut b = Self::default();
        b.insert(i);
        b
    }

    fn insert(&mut self, i: usize) -> bool {
        if self.0.len() <= i / 64 {
            self.0.resize(i / 64 + 1, 0);
        }
        let old = self.0[i / 64];
        self.0[i / 64] |= 1 << (i % 64);
        old != self.0[i / 64]
    }

    fn add(&mut self, other: &Bits) -> bool {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        let mut changed = false;
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            let new = *a | b;
            changed |= new != *a;
            *a = new;
        }
        changed
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

struct Converter<'g> {
    g: &'g Grammar,
    /// Per rule: whether it is regular (no recursion, no tokens), so it can be a terminal.
    regular: Vec<bool>,
    rule_props: Vec<Option<Props>>,
    lexemes: Vec<(Node, Props)>,
    /// Per rule used as a rule (not a terminal): its plan.
    plans: Vec<Option<Plan>>,
}

pub(super) fn choose(g: &Grammar) -> Result<Lexed, GbnfError> {
    let mut regular = vec![false; g.rules.len()];
    loop {
        let mut changed = false;
        for (i, rule) in g.rules.iter().enumerate() {
            if !regular[i] && is_regular(&rule.body, &regular) {
                regular[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut c = Converter {
        g,
        regular,
        rule_props: vec![None; g.rules.len()],
        lexemes: Vec::new(),
        plans: vec![None; g.rules.len()],
    };
    let mut todo = vec![g.root];
    while let Some(r) = todo.pop() {
        if c.plans[r].is_none() {
            let plan = c.build(&g.rules[r].body, &mut todo);
            c.plans[r] = Some(plan);
        }
    }
    loop {
        let split = c.conflicts();
        if split.is_empty() {
            break;
        }
        let mut progress = false;
        let mut plans = std::mem::take(&mut c.plans);
        for plan in plans.iter_mut().flatten() {
            progress |= c.split(plan, &split);
        }
        c.plans = plans;
        if !progress {
            break;
        }
        if c.lexemes.len() > MAX_LEXEMES {
            return Err(GbnfError {
                line: 1,
                column: 1,
                message: "the grammar is too large to convert".into(),
            });
        }
    }
    Ok(Lexed {
        plans: c.plans,
        lexemes: c.lexemes.into_iter().map(|(n, _)| n).collect(),
    })
}

fn is_regular(n: &Node, regular: &[bool]) -> bool {
    match n {
        Node::Empty | Node::Lit(_) | Node::Class(_) => true,
        Node::Token { .. } => false,
        Node::Ref(r) => regular[*r],
        Node::Seq(items) | Node::Alt(items) => items.iter().all(|i| is_regular(i, regular)),
        Node::Rep(x, _, _) => is_regular(x, regular),
    }
}

impl Converter<'_> {
    fn props(&mut self, n: &Node) -> Props {
        match n {
            Node::Empty => Props::empty(),
            Node::Lit(chars) => Props {
                first: CharSet::from_ranges(chars.first().map(|&c| (c as u32, c as u32))),
                tail: CharSet::from_ranges(chars.iter().skip(1).map(|&c| (c as u32, c as u32))),
                cont: CharSet::empty(),
                nullable: chars.is_empty(),
                nonempty: !chars.is_empty(),
            },
            Node::Class(set) => Props {
                first: set.clone(),
                nonempty: true,
                ..Props::default()
            },
            Node::Token { .. } => Props {
                nonempty: true,
                ..Props::default()
            },
            Node::Ref(r) => {
                if let Some(p) = &self.rule_props[*r] {
                    return p.clone();
                }
                let p = self.props(&self.g.rules[*r].body.clone());
                self.rule_props[*r] = Some(p.clone());
                p
            }
            Node::Seq(items) => items
                .iter()
                .fold(Props::empty(), |acc, i| acc.then(&self.props(i))),
            Node::Alt(items) => {
                let ps: Vec<Props> = items.iter().map(|i| self.props(i)).collect();
                let mut p = Props::default();
                for (i, x) in ps.iter().enumerate() {
                    p.first.add(&x.first);
                    p.tail.add(&x.tail);
                    p.cont.add(&x.cont);
                    p.nullable |= x.nullable;
                    p.nonempty |= x.nonempty;
                    for (j, y) in ps.iter().enumerate() {
                        // A complete match of one alternative that begins another.
                        if i != j {
                            if x.nullable {
                                p.cont.add(&y.first);
                            }
                            if x.first.intersects(&y.first) {
                                p.cont.add(&y.tail);
                            }
                        }
                    }
                }
                p
            }
            Node::Rep(x, min, max) => {
                if *max == Some(0) {
                    return Props::empty();
                }
                let x = self.props(x);
                let many = max.is_none_or(|m| m >= 2);
                let mut p = Props {
                    first: x.first.clone(),
                    tail: x.tail.clone(),
                    cont: CharSet::empty(),
                    nullable: *min == 0 || x.nullable,
                    nonempty: x.nonempty,
                };
                if many && x.nonempty {
                    p.tail.add(&x.first);
                }
                p.cont = if x.nullable || (many && x.cont.intersects(&x.first)) {
                    p.widest_cont()
                } else if *max != Some(*min) {
                    x.cont.union(&x.first)
                } else {
                    x.cont
                };
                p
            }
        }
    }

    fn lexeme(&mut self, n: Node) -> Plan {
        let p = self.props(&n);
        self.lexemes.push((n, p));
        Plan::Lex(self.lexemes.len() - 1)
    }

    /// The coarsest plan: regular parts as few lexemes as possible.
    fn build(&mut self, n: &Node, todo: &mut Vec<usize>) -> Plan {
        if is_regular(n, &self.regular) {
            return self.lexeme(n.clone());
        }
        match n {
            Node::Seq(items) => {
                let mut parts = Vec::new();
                let mut run: Vec<Node> = Vec::new();
                for item in items {
                    if is_regular(item, &self.regular) {
                        run.push(item.clone());
                        continue;
                    }
                    if !run.is_empty() {
                        let lex = self.lexeme(group(std::mem::take(&mut run), Node::Seq));
                        parts.push(lex);
                    }
                    parts.push(self.build(item, todo));
                }
                if !run.is_empty() {
                    parts.push(self.lexeme(group(run, Node::Seq)));
                }
                Plan::Seq(parts)
            }
            Node::Alt(items) => {
                let (reg, other): (Vec<&Node>, Vec<&Node>) =
                    items.iter().partition(|i| is_regular(i, &self.regular));
                let mut alts = Vec::new();
                if !reg.is_empty() {
                    let lex = self.lexeme(group(reg.into_iter().cloned().collect(), Node::Alt));
                    alts.push(lex);
                }
                for item in other {
                    alts.push(self.build(item, todo));
                }
                Plan::Alt(alts)
            }
            Node::Rep(x, min, max) => Plan::Rep(Box::new(self.build(x, todo)), *min, *max),
            Node::Ref(r) => {
                todo.push(*r);
                Plan::Rule(*r)
            }
            Node::Token { id, negated } => Plan::Token {
                id: *id,
                negated: *negated,
            },
            Node::Empty | Node::Lit(_) | Node::Class(_) => self.lexeme(n.clone()),
        }
    }

    fn nullable_first(&self, plan: &Plan, rules: &[(bool, Bits)]) -> (bool, Bits) {
        match plan {
            Plan::Lex(id) => (self.lexemes[*id].1.nullable, Bits::one(*id)),
            Plan::Token { .. } => (false, Bits::default()),
            Plan::Rule(r) => rules[*r].clone(),
            Plan::Seq(items) => {
                let mut first = Bits::default();
                for item in items {
                    let (nullable, f) = self.nullable_first(item, rules);
                    first.add(&f);
                    if !nullable {
                        return (false, first);
                    }
                }
                (true, first)
            }
            Plan::Alt(items) => {
                let mut out = (false, Bits::default());
                for item in items {
                    let (nullable, f) = self.nullable_first(item, rules);
                    out.0 |= nullable;
                    out.1.add(&f);
                }
                out
            }
            Plan::Rep(x, min, max) => {
                if *max == Some(0) {
                    return (true, Bits::default());
                }
                let (nullable, f) = self.nullable_first(x, rules);
                (nullable || *min == 0, f)
            }
        }
    }

    /// Lexemes to split: those greedy matching could carry past their end.
    fn conflicts(&self) -> Vec<bool> {
        let n_rules = self.g.rules.len();
        let mut rules = vec![(false, Bits::default()); n_rules];
        loop {
            let mut changed = false;
            for r in 0..n_rules {
                if let Some(plan) = &self.plans[r] {
                    let nf = self.nullable_first(plan, &rules);
                    if nf != rules[r] {
                        rules[r] = nf;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let mut w = Walk {
            rules: &rules,
            rule_follow: vec![Bits::default(); n_rules],
            follow: vec![Bits::default(); self.lexemes.len()],
            together: vec![Bits::default(); self.lexemes.len()],
            live: Bits::default(),
        };
        loop {
            let before = w.rule_follow.clone();
            for r in 0..n_rules {
                if let Some(plan) = &self.plans[r] {
                    let follow = w.rule_follow[r].clone();
                    self.walk(plan, &follow, &mut w);
                }
            }
            if w.rule_follow == before {
                break;
            }
        }
        // Two lexemes allowed together that can match the same text leave the parser at both
        // their ends at once: what may follow either is allowed together there.
        loop {
            let mut changed = false;
            for l in w.live.iter() {
                let (node, p) = &self.lexemes[l];
                for m in w.together[l].clone().iter().filter(|&m| m > l) {
                    let (m_node, q) = &self.lexemes[m];
                    let same_text = m_node == node
                        || p.first.intersects(&q.first)
                        || (p.nullable && q.nullable);
                    if !same_text {
                        continue;
                    }
                    let mut next = w.follow[l].clone();
                    next.add(&w.follow[m]);
                    for a in next.iter() {
                        changed |= w.together[a].add(&next);
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let mut split = vec![false; self.lexemes.len()];
        for l in w.live.iter() {
            let (node, p) = &self.lexemes[l];
            let mut next = CharSet::empty();
            for f in w.follow[l].iter() {
                next.add(&self.lexemes[f].1.first);
            }
            if p.cont.intersects(&next) {
                split[l] = true;
            }
            for m in w.together[l].iter().filter(|&m| m != l) {
                let (m_node, q) = &self.lexemes[m];
                if !q.first.intersects(&p.first) {
                    continue;
                }
                let ext = if m_node == node { &p.cont } else { &q.tail };
                if ext.intersects(&next) {
                    split[m] = true;
                }
            }
        }
        split
    }

    fn walk(&self, plan: &Plan, follow: &Bits, w: &mut Walk) {
        let (nullable, mut next) = self.nullable_first(plan, w.rules);
        if nullable {
            next.add(follow);
        }
        for l in next.iter() {
            w.together[l].add(&next);
        }
        match plan {
            Plan::Lex(id) => {
                w.live.insert(*id);
                w.follow[*id].add(follow);
            }
            Plan::Token { .. } => {}
            Plan::Rule(r) => {
                w.rule_follow[*r].add(follow);
            }
            Plan::Seq(items) => {
                let mut f = follow.clone();
                for item in items.iter().rev() {
                    self.walk(item, &f, w);
                    let (nullable, first) = self.nullable_first(item, w.rules);
                    if !nullable {
                        f = Bits::default();
                    }
                    f.add(&first);
                }
            }
            Plan::Alt(items) => {
                for item in items {
                    self.walk(item, follow, w);
                }
            }
            Plan::Rep(x, _, max) => {
                let mut f = follow.clone();
                if max.is_none_or(|m| m >= 2) {
                    f.add(&self.nullable_first(x, w.rules).1);
                }
                self.walk(x, &f, w);
            }
        }
    }

    /// Replaces the lexemes marked in `split` by finer plans; false if none could be split.
    fn split(&mut self, plan: &mut Plan, split: &[bool]) -> bool {
        match plan {
            Plan::Lex(id) if split.get(*id) == Some(&true) => {
                let node = self.lexemes[*id].0.clone();
                match self.split_node(&node) {
                    Some(finer) => {
                        *plan = finer;
                        true
                    }
                    None => false,
                }
            }
            Plan::Lex(_) | Plan::Token { .. } | Plan::Rule(_) => false,
            Plan::Seq(items) | Plan::Alt(items) => {
                let mut any = false;
                for item in items {
                    any |= self.split(item, split);
                }
                any
            }
            Plan::Rep(x, _, _) => self.split(x, split),
        }
    }

    fn split_node(&mut self, node: &Node) -> Option<Plan> {
        Some(match node {
            Node::Lit(chars) if chars.len() > 1 => Plan::Seq(
                chars
                    .iter()
                    .map(|&c| self.lexeme(Node::Lit(vec![c])))
                    .collect(),
            ),
            // The end of a sequence is what can go on, so it splits off first.
            Node::Seq(items) if items.len() > 1 => {
                let (init, last) = items.split_at(items.len() - 1);
                let init = self.lexeme(group(init.to_vec(), Node::Seq));
                Plan::Seq(vec![init, self.lexeme(last[0].clone())])
            }
            Node::Alt(items) => Plan::Alt(items.iter().map(|i| self.lexeme(i.clone())).collect()),
            Node::Rep(x, min, max) => Plan::Rep(Box::new(self.lexeme((**x).clone())), *min, *max),
            Node::Ref(r) => {
                let body = self.g.rules[*r].body.clone();
                return self.split_node(&body).or_else(|| Some(self.lexeme(body)));
            }
            _ => return None,
        })
    }
}

/// One node of several, or the only one.
fn group(mut items: Vec<Node>, make: fn(Vec<Node>) -> Node) -> Node {
    if items.len() == 1 {
        items.pop().unwrap_or(Node::Empty)
    } else {
        make(items)
    }
}

struct Walk<'a> {
    rules: &'a [(bool, Bits)],
    rule_follow: Vec<Bits>,
    /// Per lexeme: the lexemes that can follow it.
    follow: Vec<Bits>,
    /// Per lexeme: the lexemes the parser can allow at the same place.
    together: Vec<Bits>,
    live: Bits,
}
