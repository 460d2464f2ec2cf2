//! llama.cpp's BPE pre-tokenizers: `tokenizer.ggml.pre` names, their split regexes and the
//! vocabulary flags that come with them (`llama_vocab::impl::load` and `llm_tokenizer_bpe` in
//! llama.cpp's `src/llama-vocab.cpp`).
//!
//! The regexes are llama.cpp's, run with `fancy-regex` (the engine of the `tokenizers` crate
//! and of tiktoken) in Hugging Face's `Split(behavior = Isolated)` way: every regex in turn splits
//! every piece into its matches and the text between them. Where llama.cpp rewrote a Hugging Face
//! regex only because `std::regex` lacks a feature (letter subcategories such as `\p{Lu}`, class
//! intersection), the original regex that llama.cpp quotes in its comments is used instead, as
//! it is what the model's own tokenizer (and so the reference token ids) runs. Case-insensitive
//! contractions stay spelled out (`'[sS]` rather than `(?i:'s)`): Unicode case folding would
//! also match `ſ` and the Kelvin sign, which llama.cpp does not.

use std::sync::{Arc, Mutex};

use fancy_regex::Regex;

use super::TokenizerError;

/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)` without Unicode case folding.
macro_rules! contractions {
    () => {
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    };
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = concat!(
    contractions!(),
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2: &str = concat!(
    contractions!(),
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN35: &str = concat!(
    contractions!(),
    r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const JAIS2: &str = concat!(
    contractions!(),
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
);
/// GPT-4o's (o200k) regex as in its tokenizer.json; llama.cpp approximates the letter
/// subcategories with look-aheads.
const GPT4O: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    contractions!(),
    r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    contractions!(),
    r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Mistral's Tekken regex as in its tokenizer.json (llama.cpp approximates it like GPT4O).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Kimi K2's regex (tokenization_kimi.py), with the class intersections that llama.cpp
/// implements by hand because `std::regex` has none.
const KIMI_K2: &str = concat!(
    r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+",
    contractions!(),
    r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*",
    contractions!(),
    r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const DEEPSEEK_V3_WORDS: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const NEWLINE_RUNS: &str = r"[^\n]+|[\n]+";
const POOR_WORDS: &str = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+";

/// One splitting step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum SplitRule {
    Regex(&'static str),
    /// AFMoE's digit grouping (llama.cpp's `unicode_regex_split_custom_afmoe`; the model's
    /// tokenizer has no regex for it): a run of digits splits into its leading `len % 3` digits
    /// and then groups of three.
    AfmoeDigits,
}

use SplitRule::{AfmoeDigits, Regex as R};

/// What a `tokenizer.ggml.pre` name means to llama.cpp.
#[derive(Clone, Debug)]
pub(super) struct PreTokenizerSpec {
    pub rules: &'static [SplitRule],
    /// GPT-2's bytes-to-unicode mapping before the merges (false: raw UTF-8 with `▁` for spaces
    /// and `<0xXX>` byte tokens, as Gemma 4).
    pub byte_encode: bool,
    /// A whole pre-tokenized word that is itself a token is taken as is (Hugging Face's
    /// `ignore_merges`).
    pub ignore_merges: bool,
    /// llama.cpp's `clean_spaces` when decoding (transformers' `clean_up_tokenization_spaces`).
    pub clean_spaces: bool,
    /// Overrides the add-BOS default (metadata still wins).
    pub add_bos: Option<bool>,
    /// Spaces become `▁` before the merges.
    pub escape_whitespaces: bool,
    /// The vocabulary has no default BOS token (ChatGLM).
    pub no_default_bos: bool,
    /// Gemma 4: a word of newlines only is taken whole when it is a token.
    pub newline_words_whole: bool,
}

impl PreTokenizerSpec {
    fn new(rules: &'static [SplitRule]) -> Self {
        Self {
            rules,
            byte_encode: true,
            ignore_merges: false,
            clean_spaces: true,
            add_bos: None,
            escape_whitespaces: false,
            no_default_bos: false,
            newline_words_whole: false,
        }
    }

    fn no_clean(mut self) -> Self {
        self.clean_spaces = false;
        self
    }

    fn ignore_merges(mut self) -> Self {
        self.ignore_merges = true;
        self
    }

    fn add_bos(mut self) -> Self {
        self.add_bos = Some(true);
        self
    }
}

/// llama.cpp's pre-tokenizer for a `tokenizer.ggml.pre` name (`None`: one llama.cpp does not
/// know either, or one that needs a tokenizer model moe-edge does not implement).
pub(super) fn pre_tokenizer_spec(name: &str) -> Option<PreTokenizerSpec> {
    const DEFAULT: &[SplitRule] = &[
        R(r"[\p{P}\$\+<=>\^~\|]+"),
        R(GPT2),
        R(r"\p{N}+"),
        R(r"[0-9][0-9][0-9]"),
    ];
    const LLAMA3_RULES: &[SplitRule] = &[R(LLAMA3)];
    const QWEN2_RULES: &[SplitRule] = &[R(QWEN2)];
    const GPT2_RULES: &[SplitRule] = &[R(GPT2)];
    const STARCODER: &[SplitRule] = &[R(r"\p{N}"), R(GPT2)];
    const DEEPSEEK_LLM: &[SplitRule] = &[
        R(r"[\r\n]"),
        R(
            r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
        ),
        R(r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+"),
        R(r"\s+$"),
        R(r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+"),
        R(r"\p{N}+"),
    ];
    const DEEPSEEK_CODER: &[SplitRule] = &[
        R(r"[\r\n]"),
        R(r"\s?\p{L}+"),
        R(r"\s?\p{P}+"),
        R(r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+"),
        R(r"\p{N}"),
    ];
    const DEEPSEEK_V3: &[SplitRule] = &[
        R(r"\p{N}{1,3}"),
        R(r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"),
        R(DEEPSEEK_V3_WORDS),
    ];
    const SPARK2_5: &[SplitRule] = &[
        R(r"\p{N}{1,3}"),
        R(r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"),
        R(
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##,
        ),
        R(r"\p{N}"),
    ];
    const YOUTU: &[SplitRule] = &[
        R(
            r"[\x{AC00}-\x{D7A3}\x{3131}-\x{318E}]+|[\x{FF01}\x{2026}\x{201C}\x{201D}\x{2018}\x{2019}\x{2014}\x{FF1A}\x{FF1B}\x{FF0C}\x{3001}-\x{303F}\x{FE30}-\x{FE4F}]+|[\x{3105}-\x{312F}]+|[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+",
        ),
        R(concat!(
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
            contractions!(),
            r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
            contractions!(),
            r"?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )),
    ];
    const FALCON: &[SplitRule] = &[R(r"[\p{P}\$\+<=>\^~\|`]+"), R(GPT2), R(r"[0-9][0-9][0-9]")];
    const PORO: &[SplitRule] = &[R(POOR_WORDS)];
    const VIKING: &[SplitRule] = &[R(POOR_WORDS), R(r"\p{N}")];
    const CHAMELEON: &[SplitRule] = &[
        R(r"<sentinel:[0-9]+>"),
        R(r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"),
        R(r"([\t\n]|    |  )"),
        R(r"\p{N}"),
        R(r"[\p{P}!-/:-@\[-`{-~]"),
        R(GPT2),
    ];
    const GRANITE_EMB_MULTI: &[SplitRule] = &[R(concat!(
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+",
        contractions!(),
        r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*",
        contractions!(),
        r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ))];
    const TINY_AYA: &[SplitRule] = &[R(r"\d{1,3}(?=(?:\d{3})*\b)"), R(GPT4O)];
    const SUPERBPE: &[SplitRule] = &[R(r"\p{N}+"), R(r"(?=(\d{3})+(?!\d))")];
    // The original has possessive quantifiers (`?+`, `++`); here they are provably the same as
    // the greedy ones llama.cpp uses, because the quantified class and what follows it are
    // disjoint.
    const BAILINGMOE: &[SplitRule] = &[R(
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    )];
    const SEED_CODER: &[SplitRule] = &[R(concat!(
        contractions!(),
        r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
    ))];
    const UFAKZEKA: &[SplitRule] = &[R(
        r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    )];
    const AFMOE: &[SplitRule] = &[
        AfmoeDigits,
        R(
            r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{8C48}-\x{FAFF}\x{3040}-\x{309F}\x{30A0}-\x{30FF}\x{FF65}-\x{FF9F}\x{2F00}-\x{2FDF}\x{E40}-\x{E7F}\x{E80}-\x{EFF}\x{1780}-\x{17FF}\x{1000}-\x{109F}\x{AA60}-\x{AA7F}\x{A9E0}-\x{A9FF}\x{AC00}-\x{D7AF}\x{1100}-\x{11FF}]+",
        ),
        R(DEEPSEEK_V3_WORDS),
    ];
    const LAGUNA: &[SplitRule] = &[R(NEWLINE_RUNS), R(QWEN2)];
    const EXAONE_MOE: &[SplitRule] = &[R(concat!(
        contractions!(),
        r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
    ))];
    const NEWLINES: &[SplitRule] = &[R(NEWLINE_RUNS)];
    const MINICPM5: &[SplitRule] = &[
        R(r"\p{N}{1,3}"),
        R(concat!(
            contractions!(),
            r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )),
    ];

    let spec = PreTokenizerSpec::new;
    Some(match name {
        // llama.cpp warns and uses the default when the name is missing.
        "" | "default" => spec(DEFAULT),
        "minicpm5" => spec(MINICPM5).ignore_merges(),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => spec(LLAMA3_RULES).ignore_merges().add_bos(),
        "deepseek-llm" => spec(DEEPSEEK_LLM).no_clean(),
        "deepseek-coder" => spec(DEEPSEEK_CODER).no_clean(),
        "deepseek-v3" | "hunyuan-dense" | "hy_v4" | "joyai-llm" => spec(DEEPSEEK_V3).no_clean(),
        "spark2_5" => spec(SPARK2_5).no_clean(),
        "youtu" => spec(YOUTU).no_clean().ignore_merges(),
        "falcon" => spec(FALCON),
        "mpt" | "olmo" | "jais" => spec(GPT2_RULES),
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            spec(STARCODER)
        }
        "command-r" | "smollm" => spec(STARCODER).no_clean(),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" => spec(GPT2_RULES),
        "jais-2" => spec(&[R(JAIS2)]),
        "gemma4" | "granite-embed-multi-311m" => PreTokenizerSpec {
            byte_encode: false,
            escape_whitespaces: true,
            newline_words_whole: true,
            ..spec(NEWLINES)
        },
        "sarvam-moe" => PreTokenizerSpec {
            byte_encode: false,
            escape_whitespaces: true,
            ..spec(NEWLINES).no_clean()
        },
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" => {
            spec(QWEN2_RULES).no_clean()
        }
        "megrez" | "stablelm2" => spec(QWEN2_RULES),
        "qwen35" => spec(&[R(QWEN35)]).no_clean(),
        "dbrx" | "smaug-bpe" => spec(LLAMA3_RULES),
        "poro-chat" => spec(PORO).no_clean(),
        "bloom" | "gpt3-finnish" => spec(PORO),
        "chatglm-bpe" => PreTokenizerSpec {
            no_default_bos: true,
            ..spec(LLAMA3_RULES)
        },
        "glm4" | "glm5" => PreTokenizerSpec {
            no_default_bos: true,
            ..spec(LLAMA3_RULES).ignore_merges()
        },
        "viking" => spec(VIKING).no_clean(),
        "tekken" => spec(&[R(TEKKEN)]).no_clean().ignore_merges().add_bos(),
        "chameleon" => spec(CHAMELEON).no_clean().add_bos(),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => spec(&[R(GPT4O)]).no_clean(),
        "granite-embed-multi-97m" => spec(GRANITE_EMB_MULTI).no_clean().ignore_merges(),
        "tiny_aya" | "cohere2moe" => spec(TINY_AYA).no_clean(),
        "superbpe" => spec(SUPERBPE).no_clean(),
        "trillion" | "granite-docling" => spec(GPT2_RULES).no_clean(),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => spec(BAILINGMOE).no_clean(),
        "seed-coder" => spec(SEED_CODER).no_clean(),
        "kimi-k2" => spec(&[R(KIMI_K2)]).no_clean(),
        "ufakzeka" => spec(UFAKZEKA).no_clean(),
        "grok-2" => spec(QWEN2_RULES).no_clean(),
        "afmoe" => spec(AFMOE).no_clean(),
        "laguna" => spec(LAGUNA).no_clean(),
        "exaone-moe" => spec(EXAONE_MOE),
        _ => return None,
    })
}

enum CompiledRule {
    Regex(Arc<Regex>),
    AfmoeDigits,
}

/// `re` compiled, once per process: the regexes are a fixed set of literals, and compiling
/// their Unicode classes costs more than reading the rest of a vocabulary (a process that makes
/// many tokenizers, such as the fuzzer or the test suite, would spend most of its time there).
fn compiled(re: &'static str) -> Result<Arc<Regex>, TokenizerError> {
    static CACHE: Mutex<Vec<(&'static str, Arc<Regex>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, r)) = cache.iter().find(|(src, _)| *src == re) {
        return Ok(Arc::clone(r));
    }
    let r = Arc::new(
        Regex::new(re)
            .map_err(|e| TokenizerError::Invalid(format!("pre-tokenizer regex {re:?}: {e}")))?,
    );
    cache.push((re, Arc::clone(&r)));
    Ok(r)
}

/// A compiled pre-tokenizer: splits text into the words BPE merges run within.
pub(super) struct PreTokenizer {
    rules: Vec<CompiledRule>,
}

impl PreTokenizer {
    pub fn new(rules: &[SplitRule]) -> Result<Self, TokenizerError> {
        let rules = rules
            .iter()
            .map(|rule| match *rule {
                SplitRule::Regex(re) => compiled(re).map(CompiledRule::Regex),
                SplitRule::AfmoeDigits => Ok(CompiledRule::AfmoeDigits),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// Byte ranges of the words of `text`, in order and covering it.
    pub fn split(&self, text: &str) -> Result<Vec<std::ops::Range<usize>>, TokenizerError> {
        let mut pieces = Vec::new();
        if !text.is_empty() {
            pieces.push(0..text.len());
        }
        for rule in &self.rules {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let part = &text[piece.clone()];
                let base = piece.start;
                match rule {
                    CompiledRule::Regex(re) => {
                        // Matches and the text between them each become a piece; an empty match
                        // only marks a split point.
                        let mut at = 0;
                        for m in re.find_iter(part) {
                            let m = m.map_err(|e| {
                                TokenizerError::Encode(format!("pre-tokenizer regex: {e}"))
                            })?;
                            if m.start() > at {
                                next.push(base + at..base + m.start());
                            }
                            if m.end() > m.start() {
                                next.push(base + m.start()..base + m.end());
                            }
                            at = at.max(m.end());
                        }
                        if at < part.len() {
                            next.push(base + at..base + part.len());
                        }
                    }
                    CompiledRule::AfmoeDigits => split_afmoe_digits(part, base, &mut next),
                }
            }
            pieces = next;
        }
        Ok(pieces)
    }
}

/// llama.cpp's `unicode_regex_split_custom_afmoe`, including its quirk that text before a digit
/// run joins the run's first group (later rules split it off again).
fn split_afmoe_digits(part: &str, base: usize, out: &mut Vec<std::ops::Range<usize>>) {
    let chars: Vec<(usize, char)> = part.char_indices().collect();
    let offset = |i: usize| chars.get(i).map_or(part.len(), |&(o, _)| o);
    let mut prev_end = 0;
    let mut emit = |end: usize, out: &mut Vec<std::ops::Range<usize>>| {
        if end > prev_end {
            out.push(base + prev_end..base + end);
        }
        prev_end = end;
    };
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].1.is_numeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && chars[i].1.is_numeric() {
            i += 1;
        }
        let mut at = start + (i - start) % 3;
        if at > start {
            emit(offset(at), out);
        }
        while at < i {
            at += 3;
            emit(offset(at), out);
        }
    }
    emit(part.len(), out);
}

/// GPT-2's reversible byte-to-character map (`bytes_to_unicode`): printable Latin-1 bytes stand
/// for themselves, the others for U+0100 onwards in byte order.
pub(super) fn byte_to_char(b: u8) -> char {
    let cp = match b {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => b as u32,
        0x00..=0x20 => 0x100 + b as u32,
        0x7F..=0xA0 => 0x100 + 33 + (b - 0x7F) as u32,
        0xAD => 0x100 + 67,
    };
    char::from_u32(cp).expect("below U+0144")
}

/// The inverse of [`byte_to_char`].
pub(super) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(cp as u8),
        0x100..=0x120 => Some((cp - 0x100) as u8),
        0x121..=0x142 => Some((cp - 0x121 + 0x7F) as u8),
        0x143 => Some(0xAD),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokenizers made one after the other share each compiled regex (compiling was most of
    /// the cost of making a tokenizer).
    #[test]
    fn regexes_are_compiled_once_per_process() {
        let spec = pre_tokenizer_spec("qwen2").unwrap();
        let [a, b] = [(); 2].map(|()| PreTokenizer::new(spec.rules).unwrap());
        let mut regexes = 0;
        for (x, y) in a.rules.iter().zip(&b.rules) {
            if let (CompiledRule::Regex(x), CompiledRule::Regex(y)) = (x, y) {
                assert!(Arc::ptr_eq(x, y), "compiled twice: {}", x.as_str());
                regexes += 1;
            }
        }
        assert!(regexes > 0);
    }

    fn words<'t>(name: &str, text: &'t str) -> Vec<&'t str> {
        let spec = pre_tokenizer_spec(name).unwrap();
        let pre = PreTokenizer::new(spec.rules).unwrap();
        pre.split(text)
            .unwrap()
            .into_iter()
            .map(|r| &text[r])
            .collect()
    }

    /// Every name llama.cpp knows compiles; a name it does not know is refused.
    #[test]
    fn every_known_pre_tokenizer_compiles() {
        let names = [
            "default",
            "llama-bpe",
            "deepseek-llm",
            "deepseek-coder",
            "deepseek-v3",
            "falcon",
            "mpt",
            "starcoder",
            "gpt-2",
            "refact",
            "command-r",
            "qwen2",
            "qwen35",
            "olmo",
            "dbrx",
            "smaug-bpe",
            "poro-chat",
            "chatglm-bpe",
            "glm4",
            "viking",
            "jais",
            "jais-2",
            "tekken",
            "smollm",
            "codeshell",
            "bloom",
            "gpt3-finnish",
            "exaone",
            "exaone4",
            "exaone-moe",
            "chameleon",
            "minerva-7b",
            "gpt-4o",
            "llama4",
            "superbpe",
            "trillion",
            "bailingmoe",
            "bailingmoe2",
            "llada-moe",
            "seed-coder",
            "hunyuan",
            "hunyuan-dense",
            "kimi-k2",
            "grok-2",
            "granite-docling",
            "minimax-m2",
            "afmoe",
            "solar-open",
            "youtu",
            "qwen35",
            "tiny_aya",
            "cohere2moe",
            "joyai-llm",
            "gemma4",
            "sarvam-moe",
            "minicpm5",
            "granite-embed-multi-97m",
            "mellum2",
            "laguna",
            "hy_v4",
            "spark2_5",
            "ufakzeka",
            "lfm2",
            "stablelm2",
            "megrez",
            "kormo",
        ];
        for name in names {
            let spec = pre_tokenizer_spec(name).unwrap_or_else(|| panic!("{name} unknown"));
            PreTokenizer::new(spec.rules).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(pre_tokenizer_spec("no-such-pre").is_none());
        assert!(pre_tokenizer_spec("whitespace").is_none());
    }

    /// LFM2's `lfm2` is llama.cpp's `llama-bpe` treatment (Llama 3's regex, ignore_merges, a
    /// BOS), so the llama-bpe vocab vectors of tests/llama_vocab.rs cover it.
    #[test]
    fn lfm2_is_llama_bpe() {
        let (a, b) = (
            pre_tokenizer_spec("lfm2").unwrap(),
            pre_tokenizer_spec("llama-bpe").unwrap(),
        );
        assert!(std::ptr::eq(a.rules, b.rules));
        assert_eq!(
            (a.byte_encode, a.ignore_merges, a.clean_spaces, a.add_bos),
            (b.byte_encode, b.ignore_merges, b.clean_spaces, b.add_bos)
        );
        let text = "Hello world's  3.14!!\n\n  <|im_start|>ünï 12345";
        assert_eq!(words("lfm2", text), words("llama-bpe", text));
    }

    #[test]
    fn gpt2_splits_words_contractions_and_trailing_space() {
        assert_eq!(
            words("gpt-2", "Hello world's  3.14!!  "),
            ["Hello", " world", "'s", " ", " 3", ".", "14", "!!", "  "]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three() {
        assert_eq!(words("llama-bpe", "1234567"), ["123", "456", "7"]);
        assert_eq!(words("qwen2", "123"), ["1", "2", "3"]);
    }

    #[test]
    fn afmoe_groups_digits_from_the_right() {
        assert_eq!(words("afmoe", "1234567 x"), ["1", "234", "567", " x"]);
    }

    #[test]
    fn empty_matches_only_split() {
        // SuperBPE splits digit runs into groups of three from the right with an empty match.
        assert_eq!(words("superbpe", "1234567"), ["1", "234", "567"]);
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte('▁'), None);
    }
}
