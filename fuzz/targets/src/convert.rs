//! `convert`: a Hugging Face checkpoint folder as `moe-convert` reads it: `config.json`, one
//! safetensors shard and the tokenizer files, converted to GGUF by the real entry point
//! (`moe_convert::convert`: safetensors header, config mapping per architecture, the plan,
//! tokenizer metadata, quantization, the writer). A conversion that succeeds must give a file
//! that the runtime loads (model and tokenizer).
//!
//! Input: NUL-separated parts `config.json`, the shard's safetensors header (its JSON only),
//! `tokenizer.json`, `tokenizer_config.json` (the last two optional). The shard's data section
//! is zeros of the length the header asks for (values do not steer the mapping; fuzzing them
//! would only dilute the inputs).

use moe_convert::{convert, ConvertOptions};
use moe_runtime::gguf::GgufFile;
use moe_runtime::model::Model;
use moe_runtime::tokenizer::Tokenizer;
use serde_json::Value as Json;

use crate::util::{scratch_dir, split_nul};

/// Checkpoints whose data section would be larger are skipped (time per input).
const MAX_DATA_BYTES: u64 = 4 << 20;

/// The data length a safetensors header declares (the largest end offset), if it is JSON.
fn declared_data_len(header: &[u8]) -> u64 {
    let Ok(Json::Object(m)) = serde_json::from_slice::<Json>(header) else {
        return 0;
    };
    m.values()
        .filter_map(|t| t.get("data_offsets")?.as_array()?.get(1)?.as_u64())
        .max()
        .unwrap_or(0)
}

/// A safetensors file: the header's length, the header, zeros for the data.
pub fn shard(header: &[u8]) -> Option<Vec<u8>> {
    let data = declared_data_len(header);
    if data > MAX_DATA_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(8 + header.len() + data as usize);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header);
    out.resize(out.len() + data as usize, 0);
    Some(out)
}

pub fn run(data: &[u8]) {
    let parts = split_nul(data, 4);
    let Some(shard) = shard(parts.get(1).copied().unwrap_or_default()) else {
        return;
    };
    let dir = scratch_dir("convert");
    let src = dir.join("ckpt");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("config.json"), parts[0]).unwrap();
    std::fs::write(src.join("model.safetensors"), shard).unwrap();
    for (i, name) in [(2, "tokenizer.json"), (3, "tokenizer_config.json")] {
        if let Some(p) = parts.get(i) {
            std::fs::write(src.join(name), p).unwrap();
        }
    }
    let out = dir.join("out.gguf");
    let result = convert(&src, &out, &ConvertOptions::default(), &|_, _, _| {});
    if let Err(e) = &result {
        assert!(
            !out.exists(),
            "a failed conversion ({e}) left its output behind"
        );
    }
    if result.is_ok() {
        let file = GgufFile::open(&out).expect("the converted file opens");
        if let Err(e) = Model::load(&file) {
            panic!("moe-convert wrote a file the runtime does not load: {e}");
        }
        if let Err(e) = Tokenizer::from_gguf(file.header()) {
            panic!("moe-convert wrote a tokenizer the runtime does not load: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
