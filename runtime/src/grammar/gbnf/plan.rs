//! The lexeme structure chosen for a grammar: per rule, its expression over lexemes, rules and
//! tokens.

use super::parse::Node;

/// The lexeme structure of the grammar being converted.
#[derive(Clone, Debug)]
pub(super) enum Plan {
    Lex(usize),
    Token { id: u32, negated: bool },
    Rule(usize),
    Seq(Vec<Plan>),
    Alt(Vec<Plan>),
    Rep(Box<Plan>, u32, Option<u32>),
}

/// What [`super::lexemes`] chose: the plan of each rule used as a rule (not as a terminal),
/// and the lexemes the plans refer to.
pub(super) struct Lexed {
    pub plans: Vec<Option<Plan>>,
    pub lexemes: Vec<Node>,
}
