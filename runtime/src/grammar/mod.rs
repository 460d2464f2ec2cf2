//! Constrained decoding: output held to a JSON schema, to any JSON object, to a Lark grammar
//! (llguidance's syntax: `%json {...}` schemas inside, special tokens, lazy lexemes) or to a
//! GBNF grammar (llama.cpp's, converted to Lark by [`gbnf`]), enforced token by token by
//! llguidance, the engine llama.cpp (`LLAMA_LLGUIDANCE`) and mistral.rs use.
//!
//! - [`GrammarVocab`]: per model, built once and shared (an `Arc`): every token's bytes in a
//!   trie, llguidance's parser factory. Building it walks the whole vocabulary.
//! - [`GrammarVocab::compile`]: a [`Grammar`] to a [`Constraint`], once per request; errors
//!   say what is wrong with the schema or grammar.
//! - [`Constraint::start`]: the [`ConstraintState`] one generation advances token by token
//!   (`engine::generate` does, given a constraint in its request).
//!
//! Token bytes come from [`Tokenizer::token_bytes`]; special tokens are marked with
//! llguidance's 0xFF byte, so grammars name them as `<|im_end|>` or `<[id]>` and text never
//! matches them; all end-of-generation tokens end a grammar.

pub mod gbnf;
mod tools;

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tokenizer::Tokenizer;

pub use gbnf::{gbnf_to_lark, GbnfError, TokenNames};
pub use tools::{CallPart, ToolCallGrammar, ToolChoice};

/// JSON whitespace between tokens: one space, or one or two newlines and an indentation of at
/// most 20 (llama.cpp's `space` rule), so a small model cannot loop on whitespace.
pub const JSON_WHITESPACE: &str = r"(\x20|\n{1,2}[\x20\t]{0,20})";

/// Error messages from llguidance are cut to this many bytes.
const MAX_ERROR_LEN: usize = 600;

/// Vocabularies larger than this are refused (llguidance's trie packs token ids).
const MAX_VOCAB: usize = 1 << 22;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GrammarError {
    /// A JSON schema llguidance cannot compile (or, `strict`, uses what it does not support).
    #[error("the JSON schema is not supported: {0}")]
    Schema(String),
    #[error("the GBNF grammar does not parse: {0}")]
    Gbnf(#[from] GbnfError),
    /// A Lark grammar (or a converted GBNF one) that does not compile.
    #[error("the grammar does not compile: {0}")]
    Compile(String),
    #[error("no grammar can be used with this vocabulary: {0}")]
    Vocabulary(String),
    /// The grammar failed during generation (a limit of llguidance's, or text the vocabulary
    /// cannot spell).
    #[error("constrained decoding stopped: {0}")]
    Decoding(String),
}

/// What a request's output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against `schema` (Draft 2020-12; OpenAI's `json_schema`). With
    /// `strict`, keywords llguidance cannot enforce are errors; without, they are ignored.
    JsonSchema { schema: Value, strict: bool },
    /// llguidance's Lark syntax (<https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md>).
    Lark(String),
    /// llama.cpp's GBNF (<https://github.com/ggml-org/llama.cpp/blob/master/grammars/README.md>).
    Gbnf(String),
}

impl Grammar {
    /// llama.cpp's `grammar` field: GBNF, or Lark when it starts with `%llguidance` (as
    /// llama.cpp routes it) or has a Lark `start:` rule.
    pub fn from_llama_cpp(text: &str) -> Self {
        let lark = text.trim_start().starts_with("%llguidance")
            || text.lines().any(|l| {
                l.trim_start()
                    .strip_prefix("start")
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
            });
        if lark {
            Self::Lark(text.to_string())
        } else {
            Self::Gbnf(text.to_string())
        }
    }
}

/// The vocabulary as llguidance sees it: llguidance's tokenizer interface over the trie. Text
/// is tokenized greedily only for llguidance's own uses, since forced tokens are off.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// A model's vocabulary prepared for grammars: built once, shared by every request.
pub struct GrammarVocab {
    factory: ParserFactory,
    /// Logits per step (the model's vocabulary size).
    n_vocab: usize,
    end_of_generation: Vec<u32>,
}

impl GrammarVocab {
    /// From the tokenizer's token bytes, for logits of `n_vocab` entries (ids the tokenizer
    /// does not know are never allowed).
    pub fn new(tokenizer: &Tokenizer, n_vocab: usize) -> Result<Self, GrammarError> {
        let words: Vec<Vec<u8>> = (0..n_vocab as u32)
            .map(|id| match tokenizer.token_bytes(id) {
                Some(bytes) if tokenizer.is_special(id) && !bytes.is_empty() => {
                    let mut marked = Vec::with_capacity(bytes.len() + 1);
                    marked.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    marked.extend_from_slice(&bytes);
                    marked
                }
                Some(bytes) => bytes,
                None => Vec::new(),
            })
            .collect();
        let end: Vec<u32> = (0..n_vocab as u32)
            .filter(|&id| tokenizer.is_end_of_generation(id))
            .collect();
        Self::from_token_bytes(words, &end)
    }

    /// From each token's bytes (a special token's: 0xFF then its name; an id that is no token:
    /// empty) and the ids that end generation.
    pub fn from_token_bytes(
        mut words: Vec<Vec<u8>>,
        end_of_generation: &[u32],
    ) -> Result<Self, GrammarError> {
        let n_vocab = words.len();
        if n_vocab == 0 || n_vocab > MAX_VOCAB {
            return Err(GrammarError::Vocabulary(format!(
                "{n_vocab} tokens (1 to {MAX_VOCAB} are supported)"
            )));
        }
        if let Some(bad) = end_of_generation.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(GrammarError::Vocabulary(format!(
                "end-of-generation token {bad} is outside the vocabulary"
            )));
        }
        // llguidance needs an end token; without one, a token no logit can reach stands in.
        let mut end = end_of_generation.to_vec();
        if end.is_empty() {
            end.push(n_vocab as u32);
            words.push(Vec::new());
        }
        let info = TokRxInfo {
            vocab_size: words.len() as u32,
            tok_eos: end[0],
            tok_bos: None,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&end);
        let env: TokEnv = Arc::new(TrieEnv { trie });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(cut(e)))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            // Errors go back to clients: no parser state or grammar dump in them.
            verbose_errors: false,
            ..ParserLimits::default()
        };
        end.sort_unstable();
        Ok(Self {
            factory,
            n_vocab,
            end_of_generation: end,
        })
    }

    /// The model's vocabulary size (logits per step).
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    fn trie(&self) -> &TokTrie {
        self.factory.tok_env().tok_trie()
    }

    /// The special token named `name` (such as `<tool_call>`), if the vocabulary has one.
    pub fn special_token(&self, name: &str) -> Option<u32> {
        self.trie().get_special_token(name)
    }

    /// `bytes` as tokens, longest match first (not the model's tokenization: for tests and
    /// measurements). Bytes no token spells are skipped.
    pub fn greedy_tokenize(&self, bytes: &[u8]) -> Vec<u32> {
        self.trie().greedy_tokenize(bytes)
    }

    /// Compiles a grammar for one request. The first step's mask is computed here, so a
    /// grammar the vocabulary cannot begin to spell is refused before generation starts.
    pub fn compile(self: &Arc<Self>, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let top = match grammar {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(json_options(json!({"type": "object"}), true)?)
            }
            Grammar::JsonSchema { schema, strict } => {
                TopLevelGrammar::from_json_schema(json_options(schema.clone(), *strict)?)
            }
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Grammar::Gbnf(text) => TopLevelGrammar::from_lark(gbnf_to_lark(text, &**self)?),
        };
        let is_schema = matches!(grammar, Grammar::JsonObject | Grammar::JsonSchema { .. });
        let failed = |e: String| {
            if is_schema {
                GrammarError::Schema(cut(e))
            } else {
                GrammarError::Compile(cut(e))
            }
        };
        let mut matcher = Matcher::new(self.factory.create_parser(top));
        if let Some(e) = matcher.get_error() {
            return Err(failed(e));
        }
        let mask = matcher.compute_mask().map_err(|e| failed(e.to_string()))?;
        if mask.is_zero() {
            return Err(failed(
                "no token of the model's vocabulary can begin the text it allows".into(),
            ));
        }
        Ok(Constraint {
            matcher,
            vocab: self.clone(),
        })
    }
}

impl TokenNames for GrammarVocab {
    /// Special tokens by name, other tokens by their exact bytes.
    fn token_id(&self, text: &str) -> Option<u32> {
        self.special_token(text)
            .or_else(|| self.trie().token_id(text.as_bytes()))
    }

    fn n_vocab(&self) -> usize {
        self.n_vocab
    }
}

/// The schema with moe-edge's llguidance options (bounded whitespace; `lenient` unless
/// strict), keeping options the schema sets itself.
fn json_options(mut schema: Value, strict: bool) -> Result<Value, GrammarError> {
    let Some(obj) = schema.as_object_mut() else {
        return Err(GrammarError::Schema(format!(
            "a schema must be a JSON object, got {}",
            cut(schema.to_string())
        )));
    };
    let mut options = json!({"whitespace_pattern": JSON_WHITESPACE, "lenient": !strict});
    if let (Some(own), Some(options)) = (
        obj.get("x-guidance").and_then(Value::as_object),
        options.as_object_mut(),
    ) {
        for (k, v) in own {
            options.insert(k.clone(), v.clone());
        }
    }
    obj.insert("x-guidance".into(), options);
    Ok(schema)
}

fn cut(e: impl ToString) -> String {
    let mut s = e.to_string();
    if s.len() > MAX_ERROR_LEN {
        let mut at = MAX_ERROR_LEN;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
    s
}

/// A grammar compiled for one request; [`Constraint::start`] begins a generation.
pub struct Constraint {
    /// Started, with the first mask computed (kept in llguidance's caches).
    matcher: Matcher,
    vocab: Arc<GrammarVocab>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.clone(),
            vocab: self.vocab.clone(),
        }
    }
}

impl Constraint {
    /// The state of a new generation at its first token.
    pub fn start(&self) -> ConstraintState {
        ConstraintState {
            matcher: self.matcher.clone(),
            vocab: self.vocab.clone(),
        }
    }

    pub fn vocab(&self) -> &Arc<GrammarVocab> {
        &self.vocab
    }
}

/// Where one generation is in its grammar.
pub struct ConstraintState {
    matcher: Matcher,
    vocab: Arc<GrammarVocab>,
}

impl ConstraintState {
    fn failed(&self, e: impl ToString) -> GrammarError {
        GrammarError::Decoding(cut(e))
    }

    /// Whether the grammar is complete and nothing but end of generation may follow.
    pub fn is_finished(&self) -> Result<bool, GrammarError> {
        if !self.matcher.is_stopped() {
            return Ok(false);
        }
        let reason = self.matcher.stop_reason();
        if reason.is_ok() {
            Ok(true)
        } else {
            Err(self.failed(self.matcher.get_error().unwrap_or(reason.to_string())))
        }
    }

    /// Whether the grammar could end here (end-of-generation tokens are allowed).
    pub fn is_accepting(&mut self) -> Result<bool, GrammarError> {
        if self.matcher.is_stopped() {
            return self.is_finished();
        }
        self.matcher.is_accepting().map_err(|e| self.failed(e))
    }

    /// Whether token `id` may come next (an end-of-generation token: whether the grammar may
    /// end here). The cheap check done on every sampled token.
    pub fn allows(&mut self, id: u32) -> Result<bool, GrammarError> {
        if id as usize >= self.vocab.n_vocab {
            return Ok(false);
        }
        if self.matcher.is_stopped() {
            return Ok(self.is_finished()? && self.vocab.is_end_of_generation(id));
        }
        let n = self
            .matcher
            .validate_tokens(&[id])
            .map_err(|e| self.failed(e))?;
        Ok(n == 1)
    }

    /// Sets the logits of the tokens the grammar does not allow next to -inf (also the
    /// end-of-generation tokens unless `allow_end`), and returns how many are left.
    pub fn mask(&mut self, logits: &mut [f32], allow_end: bool) -> Result<usize, GrammarError> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| self.failed(e))?;
        let n = logits.len();
        mask.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        if !allow_end {
            for &t in &self.vocab.end_of_generation {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(logits.iter().filter(|l| **l != f32::NEG_INFINITY).count())
    }

    /// Advances past token `id` (not an end-of-generation token: those end generation).
    pub fn accept(&mut self, id: u32) -> Result<(), GrammarError> {
        self.matcher.consume_token(id).map_err(|e| self.failed(e))
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.vocab.is_end_of_generation(id)
    }
}

#[cfg(test)]
mod tests;
