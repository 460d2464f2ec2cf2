//! `onnx`: a pre-gating router file (ONNX) as `--predictor pregate` loads it: the protobuf
//! reader (`OnnxModel::parse`), the check that the graph is the GRU step moe-edge runs natively,
//! the `moe_edge.*` metadata and the initialisers' shapes (`GruPredictor::from_bytes`), then a
//! few prediction steps. The model it is checked against takes its layer and expert counts from
//! the file's own metadata, so that inputs get past the "belongs to another model" check.

use std::path::Path;

use moe_runtime::moe::gru::GruPredictor;
use moe_runtime::moe::predictor::{ExpertPredictor, Predictions};
use moe_runtime::onnx::OnnxModel;

pub fn run(data: &[u8]) {
    let Ok(m) = OnnxModel::parse(data) else {
        return;
    };
    let num = |k: &str| m.metadata(k).and_then(|v| v.trim().parse::<usize>().ok());
    // A real model's counts are small; capped so that the harness does not ask for more.
    let n_expert = num("moe_edge.n_expert").unwrap_or(8).min(1024);
    let n_layers = m
        .metadata("moe_edge.layers")
        .and_then(|v| {
            v.split(',')
                .filter_map(|l| l.trim().parse::<usize>().ok())
                .max()
        })
        .map_or(4, |l| l.saturating_add(1))
        .min(256);
    let Ok(mut gru) =
        GruPredictor::from_bytes(data, Path::new("fuzz.onnx"), n_layers, n_expert, None)
    else {
        return;
    };
    let _ = gru.weight_bytes();
    let mut out = Predictions::default();
    let tokens: Vec<u32> = data.iter().take(4).map(|&b| b as u32).collect();
    let _ = gru.predict(&tokens, 0, &mut out);
    let _ = gru.predict(&[u32::MAX], tokens.len(), &mut out);
}
