//! `gguf`: a whole GGUF file. The header and tensor table are parsed; a file that parses is
//! then loaded as a model (hyper-parameters, every tensor's shape and type, the tokenizer) and,
//! when it loads, runs one forward step over a short context.

use moe_runtime::gguf::{GgufFile, GgufHeader};
use moe_runtime::model::{KvType, Model, Session};
use moe_runtime::tokenizer::Tokenizer;

use crate::util::MemFile;

/// The forward pass is skipped above this many tensor bytes: a step over a large random model
/// is slow and finds nothing that a small one does not.
const MAX_FORWARD_BYTES: usize = 4 << 20;

pub fn run(data: &[u8]) {
    crate::util::one_thread();
    let Ok(h) = GgufHeader::parse(data) else {
        return;
    };
    for t in h.tensors() {
        assert!(
            t.range.start >= h.data_start && t.range.end <= data.len(),
            "tensor {} [{:?}] outside the file's data ({} bytes)",
            t.name,
            t.range,
            data.len()
        );
        let _ = t.n_elements();
    }
    for (_, v) in h.metadata() {
        let _ = (
            v.as_u64(),
            v.as_f64(),
            v.as_str(),
            v.as_bool(),
            v.as_array(),
        );
    }
    let _ = Tokenizer::from_gguf(&h);

    let mem = MemFile::new(data);
    let file = GgufFile::open(mem.path()).expect("a header that parsed opens");
    let Ok(model) = Model::load(&file) else {
        return;
    };
    if h.tensor_data_bytes() > MAX_FORWARD_BYTES {
        return;
    }
    let n_ctx = model.hp.n_ctx_train.clamp(1, 4);
    let mut session = Session::with_kv_type(&model, n_ctx, KvType::F32);
    let vocab = model.hp.n_vocab.max(1) as u32;
    let tokens: Vec<u32> = (0..n_ctx.min(2) as u32).map(|i| i % vocab).collect();
    let _ = session.forward(&tokens, false);
}
