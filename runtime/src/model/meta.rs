//! An architecture's `{arch}.*` metadata keys, read with errors that name the key.

use crate::gguf::{GgufHeader, Value};

use super::error::ModelError;

pub(crate) struct Meta<'h> {
    pub(crate) h: &'h GgufHeader,
    pub(crate) prefix: &'static str,
}

impl<'h> Meta<'h> {
    pub(crate) fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.prefix)
    }

    pub(crate) fn get(&self, k: &str) -> Option<&'h Value> {
        self.h.get(&self.key(k))
    }

    pub(crate) fn missing(&self, k: &str) -> ModelError {
        ModelError::Metadata {
            key: self.key(k),
            why: "is missing".into(),
        }
    }

    pub(crate) fn usize(&self, k: &str) -> Result<usize, ModelError> {
        self.opt_usize(k)?.ok_or_else(|| self.missing(k))
    }

    pub(crate) fn opt_usize(&self, k: &str) -> Result<Option<usize>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| ModelError::Metadata {
                    key: self.key(k),
                    why: format!("must be a non-negative integer, found {v:?}"),
                }),
        }
    }

    pub(crate) fn opt_f32(&self, k: &str) -> Result<Option<f32>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| ModelError::Metadata {
                    key: self.key(k),
                    why: format!("must be a number, found {v:?}"),
                }),
        }
    }

    pub(crate) fn opt_bool(&self, k: &str) -> Result<Option<bool>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| ModelError::Metadata {
                key: self.key(k),
                why: format!("must be a bool, found {v:?}"),
            }),
        }
    }
}
