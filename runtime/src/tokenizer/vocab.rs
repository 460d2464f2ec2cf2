//! The token table of a `tokenizer.ggml.*` vocabulary: texts, scores and llama.cpp's token
//! attributes (`llama_token_attr`).

use std::hash::{BuildHasher, RandomState};

use hashbrown::hash_table::{Entry, HashTable};

/// llama.cpp's `LLAMA_TOKEN_ATTR_*` bits.
pub(super) mod attr {
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
    pub const LSTRIP: u32 = 1 << 7;
    pub const RSTRIP: u32 = 1 << 8;

    /// The attribute of a `tokenizer.ggml.token_type` value (`LLAMA_TOKEN_TYPE_*`).
    pub fn from_token_type(ty: i64) -> u32 {
        match ty {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => 0, // undefined
        }
    }
}

pub(super) struct Vocab {
    texts: Vec<String>,
    scores: Vec<f32>,
    attrs: Vec<u32>,
    /// Ids by the hash of their text (the texts are not stored twice).
    ids: HashTable<u32>,
    hasher: RandomState,
}

impl Vocab {
    /// `texts`, `scores` and `attrs` have one entry per token; texts must be distinct.
    pub fn new(texts: Vec<String>, scores: Vec<f32>, attrs: Vec<u32>) -> Result<Self, String> {
        debug_assert!(texts.len() == scores.len() && texts.len() == attrs.len());
        if u32::try_from(texts.len()).is_err() {
            return Err("more than 2^32 tokens".into());
        }
        let hasher = RandomState::new();
        let mut ids = HashTable::with_capacity(texts.len());
        for (id, text) in texts.iter().enumerate() {
            let hash = hasher.hash_one(text.as_str());
            match ids.entry(
                hash,
                |&other: &u32| texts[other as usize] == *text,
                |&other: &u32| hasher.hash_one(texts[other as usize].as_str()),
            ) {
                Entry::Occupied(first) => {
                    return Err(format!(
                        "tokens {} and {id} are both {text:?} (llama.cpp refuses such a vocabulary too)",
                        first.get()
                    ))
                }
                Entry::Vacant(slot) => {
                    slot.insert(id as u32);
                }
            }
        }
        Ok(Self {
            texts,
            scores,
            attrs,
            ids,
            hasher,
        })
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(text);
        self.ids
            .find(hash, |&id| self.texts[id as usize] == text)
            .copied()
    }

    /// `id` must be below [`len`](Self::len).
    pub fn text(&self, id: u32) -> &str {
        &self.texts[id as usize]
    }

    pub fn score(&self, id: u32) -> f32 {
        self.scores[id as usize]
    }

    pub fn attr(&self, id: u32) -> u32 {
        self.attrs[id as usize]
    }

    pub fn has_attr(&self, id: u32, bits: u32) -> bool {
        self.attr(id) & bits != 0
    }

    pub fn set_attr(&mut self, id: u32, attr: u32) {
        self.attrs[id as usize] = attr;
    }

    pub fn set_attr_bits(&mut self, id: u32, bits: u32, on: bool) {
        let a = &mut self.attrs[id as usize];
        *a = if on { *a | bits } else { *a & !bits };
    }

    pub fn contains(&self, id: u32) -> bool {
        (id as usize) < self.texts.len()
    }
}
