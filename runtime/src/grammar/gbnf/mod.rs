//! llama.cpp's GBNF grammars (the `grammar` request field, `--grammar`), converted to
//! llguidance's Lark syntax, which has no GBNF reader of its own.
//!
//! The text is parsed as llama.cpp parses it ([`parse`]), then written as Lark with lexemes
//! chosen so that llguidance's greedy lexer accepts the same texts as llama.cpp's
//! character-by-character matcher ([`lexemes`]). Token references become numeric (`<[id]>`),
//! resolved through the model's vocabulary as llama.cpp does: `<text>` must be one token.

mod charset;
mod emit;
mod lexemes;
mod parse;
mod plan;

/// A GBNF grammar that does not parse, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct GbnfError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The vocabulary a grammar's tokens (`<[id]>`, `<text>`) refer to.
pub trait TokenNames {
    /// The id of the one token spelled `text` (such as `<think>`), if there is one.
    fn token_id(&self, text: &str) -> Option<u32>;
    fn n_vocab(&self) -> usize;
}

/// Converts a GBNF grammar to llguidance's Lark syntax (its `root` becomes `start`).
pub fn gbnf_to_lark(gbnf: &str, tokens: &dyn TokenNames) -> Result<String, GbnfError> {
    let grammar = parse::parse(gbnf, tokens)?;
    let lexed = lexemes::choose(&grammar)?;
    Ok(emit::lark(&grammar, &lexed))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoTokens;
    impl TokenNames for NoTokens {
        fn token_id(&self, text: &str) -> Option<u32> {
            (text == "<think>").then_some(7)
        }
        fn n_vocab(&self) -> usize {
            100
        }
    }

    fn lark(gbnf: &str) -> String {
        gbnf_to_lark(gbnf, &NoTokens).unwrap_or_else(|e| panic!("{gbnf}: {e}"))
    }

    fn err(gbnf: &str) -> GbnfError {
        gbnf_to_lark(gbnf, &NoTokens).expect_err(gbnf)
    }

    #[test]
    fn regular_grammars_become_one_terminal() {
        assert_eq!(
            lark("root ::= \"yes\" | \"no\""),
            "start: LEX\nLEX: \"yes\" | \"no\"\n"
        );
        assert_eq!(
            lark("root ::= w \"ing\"\nw ::= [a-z]+"),
            "start: LEX\nLEX: W \"ing\"\nW: /[a-z]/+\n"
        );
        // Escapes, negated classes, `.` and bounds.
        assert_eq!(
            lark(r#"root ::= "\x41\u00e9\"\\" [^\n] . [a-]{2,} "t"{3} "u"{0,2}"#),
            "start: LEX\nLEX: \"Aé\\\"\\\\\" /[\\x{0}-\\x{9}\\x{B}-\\x{D7FF}\\x{E000}-\\x{10FFFF}]/ /(?s:.)/ /[\\x{2D}a]/{2,} \"t\"{3} \"u\"{0,2}\n"
        );
    }

    #[test]
    fn recursion_keeps_rules_and_greedy_overlaps_are_split() {
        // `ws` may eat the newline that must follow it: it is matched character by character.
        let out = lark(
            "root ::= (expr \"\\n\")+\nexpr ::= \"(\" expr \")\" ws | [a-z] ws\nws ::= [ \\n]*",
        );
        assert!(
            out.contains("ws*") || out.contains("/[\\x{A}\\x{20}]/*"),
            "{out}"
        );
        // Safe merges stay: `"(" ` is one lexeme.
        let out = lark("root ::= \"{\" ws root ws \"}\" | \"x\"\nws ::= \" \"?");
        assert!(out.contains("LEX: \"{\" WS"), "{out}");
    }

    #[test]
    fn tokens_resolve_through_the_vocabulary() {
        assert_eq!(
            lark("root ::= <think> !<[3]>* <[4]>"),
            "start: <[7]> <[^3]>* <[4]>\n"
        );
        assert!(err("root ::= <nope>").message.contains("not one token"));
        assert!(err("root ::= <[100]>")
            .message
            .contains("below the vocabulary size"));
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = err("root ::= a\n");
        assert_eq!((e.line, e.column), (1, 10), "{e}");
        assert!(e.message.contains("undefined rule `a`"));
        let e = err("root ::= \"a\"\nx ::= [b");
        assert_eq!(e.line, 2, "{e}");
        assert!(err("x ::= \"a\"").message.contains("no `root`"));
        assert!(err("root ::= \"a\" ::=").message.contains("unexpected"));
        assert!(err("root ::= * \"a\"").message.contains("follows nothing"));
        assert!(err("root ::= \"a\"{2001}").message.contains("2000"));
        assert!(err("root ::= \"\\q\"").message.contains("unknown escape"));
        assert!(err("root ::= \"\\uD800\"")
            .message
            .contains("not a character"));
        assert!(err("root ::= [^\\x00-\\U0010FFFF]")
            .message
            .contains("matches nothing"));
        assert!(err("root ::= \"a\"{3,2}")
            .message
            .contains("below the minimum"));
    }
}
