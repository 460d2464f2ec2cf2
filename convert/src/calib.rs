//! `moe-convert --calib`: runs the converted model over calibration text through the runtime
//! and gathers per layer and expert statistics (see `moe_runtime::moe::calib` for what each
//! one means and how it is stored), and an importance matrix (the squared inputs of every
//! weight matrix, [`crate::imatrix::Collected`]).
//!
//! The text is cut into windows as llama-imatrix cuts it into chunks, so that an importance
//! matrix from here sums what `llama-imatrix -c WINDOW` sums on the same text: tokenized with
//! the tokenizer's special tokens, each window run from an empty context with its first token
//! replaced by BOS when the tokenizer adds one. The importance matrix takes only whole windows
//! (llama-imatrix drops the tail); the routing statistics take the tail too.

use std::fmt::Write as _;
use std::path::Path;

use crate::imatrix::Collected;
use moe_runtime::gguf::GgufFile;
use moe_runtime::model::{KvType, LayerRouting, Model, Session};
use moe_runtime::moe::calib::CalibStats;
use moe_runtime::tokenizer::Tokenizer;

use crate::error::ConvertError;

/// How much text to run.
#[derive(Clone, Debug)]
pub struct CalibOptions {
    /// Calibration text file.
    pub text: std::path::PathBuf,
    /// Use at most this many tokens of it.
    pub max_tokens: usize,
    /// Measure the output error of dropping each expert on this many of those tokens (the
    /// model runs once per expert over them, so this is the expensive part; 0 skips it).
    pub kl_tokens: usize,
    /// Tokens per window (each window starts from an empty context).
    pub window: usize,
}

impl Default for CalibOptions {
    fn default() -> Self {
        Self {
            text: Default::default(),
            max_tokens: 8192,
            kl_tokens: 256,
            window: 256,
        }
    }
}

/// What a calibration run measured.
#[derive(Debug)]
pub struct Calibration {
    pub stats: CalibStats,
    /// The importance matrix of the whole windows; None when the text fills none.
    pub imatrix: Option<Collected>,
}

fn model_err(e: impl std::fmt::Display) -> ConvertError {
    ConvertError::Input(format!("calibration run: {e}"))
}

/// Runs the model in `gguf` over the calibration text.
pub fn calibrate(gguf: &Path, opts: &CalibOptions) -> Result<Calibration, ConvertError> {
    let file = GgufFile::open(gguf)?;
    let model = Model::load(&file).map_err(model_err)?;
    let tok = Tokenizer::from_gguf(file.header()).map_err(model_err)?;
    calibrate_model(&model, &tok, opts)
}

/// [`calibrate`] with the model and its tokenizer already loaded.
pub fn calibrate_model(
    model: &Model,
    tok: &Tokenizer,
    opts: &CalibOptions,
) -> Result<Calibration, ConvertError> {
    let text = std::fs::read_to_string(&opts.text).map_err(|e| ConvertError::io(&opts.text, e))?;
    let mut ids = tok.encode(&text, true).map_err(model_err)?;
    // llama-imatrix's `common_tokenize(.., add_special = true)` then BOS as every chunk's first
    // token: a tokenizer that adds BOS put it first.
    let bos = tok.bos().filter(|&b| ids.first() == Some(&b));
    ids.truncate(opts.max_tokens);
    let hp = &model.hp;
    let window = opts.window.min(hp.n_ctx_train).max(1);
    if ids.len() < 2 {
        return Err(ConvertError::Input(format!(
            "{}: the calibration text encodes to {} tokens; give a longer text",
            opts.text.display(),
            ids.len()
        )));
    }
    let (n_layer, n_expert) = (hp.n_layer, hp.n_expert);
    let mut stats = CalibStats::new(n_layer, n_expert);
    let mut session = Session::with_kv_type(model, window, KvType::F32);
    session.set_route_tracing(true);
    session.set_input_sums(true);
    let mut windows = 0;
    let mut imatrix = None;
    let mut buf = Vec::with_capacity(window);
    for chunk in ids.chunks(window) {
        if chunk.len() < window {
            // The tail: routing statistics only.
            imatrix = session.take_input_sums();
            session.set_input_sums(false);
        } else {
            windows += 1;
        }
        buf.clear();
        buf.extend_from_slice(chunk);
        if let Some(b) = bos {
            buf[0] = b;
        }
        session.reset();
        session.forward(&buf, false).map_err(model_err)?;
        accumulate(&mut stats, &session.take_route_trace(), n_expert);
        stats.tokens += chunk.len() as u64;
    }
    let imatrix = imatrix.or_else(|| session.take_input_sums());
    session.set_input_sums(false);
    let imatrix = imatrix.filter(|_| windows > 0).map(|sums| Collected {
        entries: sums.named(model.file.header()),
        chunk_count: windows,
        chunk_size: window,
        datasets: vec![opts.text.display().to_string()],
    });
    let inv = 1.0 / stats.tokens as f32;
    stats.frequency.iter_mut().for_each(|v| *v *= inv);
    stats.router_mass.iter_mut().for_each(|v| *v *= inv);
    stats.coactivation.iter_mut().for_each(|v| *v *= inv);

    // Output error of dropping each expert: mean KL(full || masked) of the next-token
    // distributions over the first `kl_tokens` tokens.
    session.set_route_tracing(false);
    let kl_ids = &ids[..opts.kl_tokens.min(ids.len())];
    if !kl_ids.is_empty() {
        let base = all_log_probs(&mut session, kl_ids, window, hp.n_vocab)?;
        for l in model.moe_layers() {
            for e in 0..n_expert {
                let mut mask = vec![false; n_layer * n_expert];
                mask[l * n_expert + e] = true;
                session.set_expert_mask(Some(mask)).map_err(model_err)?;
                let masked = all_log_probs(&mut session, kl_ids, window, hp.n_vocab)?;
                stats.drop_kl[l * n_expert + e] = mean_kl(&base, &masked, hp.n_vocab) as f32;
            }
        }
        session.set_expert_mask(None).map_err(model_err)?;
    }
    Ok(Calibration { stats, imatrix })
}

fn accumulate(stats: &mut CalibStats, trace: &[LayerRouting], n_expert: usize) {
    let mut prev: Option<&LayerRouting> = None;
    for r in trace {
        for route in &r.routes {
            for (&e, &w) in route.experts.iter().zip(&route.weights) {
                let i = r.layer * n_expert + e as usize;
                stats.frequency[i] += 1.0;
                stats.router_mass[i] += w;
            }
        }
        if let Some(p) = prev.filter(|p| p.layer + 1 == r.layer && p.first_pos == r.first_pos) {
            for (now, before) in r.routes.iter().zip(&p.routes) {
                for &e in &now.experts {
                    let row = (r.layer * n_expert + e as usize) * n_expert;
                    for &q in &before.experts {
                        stats.coactivation[row + q as usize] += 1.0;
                    }
                }
            }
        }
        prev = Some(r);
    }
}

/// Log-softmax of the logits at every position of `ids`, run in windows.
fn all_log_probs(
    session: &mut Session,
    ids: &[u32],
    window: usize,
    vocab: usize,
) -> Result<Vec<f32>, ConvertError> {
    let mut out = Vec::with_capacity(ids.len() * vocab);
    for chunk in ids.chunks(window) {
        session.reset();
        let logits = session.forward(chunk, true).map_err(model_err)?;
        for row in logits.chunks_exact(vocab) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let lse = max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
            out.extend(row.iter().map(|&v| v - lse));
        }
    }
    Ok(out)
}

/// Mean over rows of KL(p || q) from log-probabilities.
fn mean_kl(logp: &[f32], logq: &[f32], vocab: usize) -> f64 {
    let rows = logp.len() / vocab;
    let total: f64 = logp
        .chunks_exact(vocab)
        .zip(logq.chunks_exact(vocab))
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
                .sum::<f64>()
        })
        .sum();
    total / rows.max(1) as f64
}

/// A per-layer table: experts by frequency, with router mass, drop KL and the previous layer's
/// expert most often active together with it.
pub fn report(stats: &CalibStats) -> String {
    let mut s = String::new();
    let n = stats.n_expert;
    let _ = writeln!(
        s,
        "calibration: {} tokens, {} layers x {} experts (freq = share of tokens selecting the expert; mass = mean routing weight; drop KL = mean KL of the next-token distribution with the expert masked, nats; with = previous layer's expert most often active together, share of this expert's tokens)",
        stats.tokens, stats.n_layer, n
    );
    for l in 0..stats.n_layer {
        if stats.frequency[l * n..(l + 1) * n]
            .iter()
            .all(|&f| f == 0.0)
        {
            continue;
        }
        let _ = writeln!(s, "layer {l}:");
        let _ = writeln!(s, "  expert  freq%   mass    drop KL   with (share)");
        for e in stats.by_frequency(l) {
            let i = stats.idx(l, e);
            let row = &stats.coactivation[i * n..(i + 1) * n];
            let with = if l > 0 {
                let (p, v) =
                    row.iter()
                        .enumerate()
                        .fold((0, 0f32), |b, (p, &v)| if v > b.1 { (p, v) } else { b });
                let share = v / stats.frequency[i].max(1e-9);
                format!("{p:>3} ({:>4.0}%)", 100.0 * share)
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "  {e:>6} {:>6.2} {:>7.4} {:>9.5}   {with}",
                100.0 * stats.frequency[i],
                stats.router_mass[i],
                stats.drop_kl[i],
            );
        }
    }
    s
}

/// The statistics and the kept experts as JSON (for plots).
pub fn to_json(stats: &CalibStats, kept: &[Vec<usize>]) -> serde_json::Value {
    serde_json::json!({
        "tokens": stats.tokens,
        "n_layer": stats.n_layer,
        "n_expert": stats.n_expert,
        "frequency": stats.frequency,
        "router_mass": stats.router_mass,
        "drop_kl": stats.drop_kl,
        "coactivation": stats.coactivation,
        "kept": kept,
    })
}
