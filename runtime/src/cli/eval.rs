//! `moe-run eval`: perplexity of a text, decoded one token at a time as generation runs (so
//! the expert cache and the lossy routing options behave as they do on a board), plus each
//! position's most likely next token for agreement with a reference model
//! (scripts/bench/quality_table.py compares runs).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::args::StreamingArgs;
use crate::engine::{Engine, SessionOptions};
use crate::model::KvType;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Model file (GGUF)
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Text file to score
    #[arg(long)]
    text: PathBuf,
    /// Score at most this many tokens of it
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Tokens per window; each window starts from an empty context
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Score as llama.cpp's `llama-perplexity -c WINDOW` does, so that the two report the
    /// perplexity of the same tokens: the text tokenized with special tokens (one trailing
    /// newline dropped, as its `-f` does), whole windows only, each window's first token replaced
    /// by BOS when the tokenizer adds one, and only the second half of each window scored.
    #[arg(long)]
    like_llama_perplexity: bool,
    /// A reference model (the unquantized file) run beside this one over the same tokens: the
    /// report adds the mean KL divergence of this model's next-token distribution from the
    /// reference's, as `llama-perplexity --kl-divergence` does, and how often their most likely
    /// tokens agree
    #[arg(long, value_name = "REF.gguf")]
    reference: Option<PathBuf>,
    /// Worker threads (default: all cores)
    #[arg(short = 't', long)]
    threads: Option<usize>,
    #[command(flatten)]
    streaming: StreamingArgs,
}

pub fn run(args: EvalArgs, out: &mut dyn Write, _err: &mut dyn Write) -> Result<()> {
    let engine = Engine::open(
        &args.model,
        SessionOptions {
            target_profile: "none".into(),
            threads: args.threads,
            kv_type: Some(KvType::F32),
            streaming: args.streaming.options(),
            ..SessionOptions::default()
        },
    )?;
    let file = engine.file();
    let model = engine.load_model()?;
    let tok = engine
        .tokenizer()
        .map_err(|e| super::needs_tokenizer(e, "eval", ""))?;
    let mut text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let window = args.window.min(model.hp.n_ctx_train).max(2);
    let like_llama = args.like_llama_perplexity;
    if like_llama && text.ends_with('\n') {
        text.pop();
    }
    let mut ids = tok.encode(&text, like_llama)?;
    ids.truncate(args.max_tokens);
    // Positions scored within a window: all, or llama-perplexity's second half.
    let first_scored = if like_llama {
        ids.truncate(ids.len() / window * window);
        window / 2
    } else {
        0
    };
    // llama-perplexity puts BOS first in every window when the tokenizer adds one.
    let window_bos = match tok.bos() {
        Some(bos) if like_llama && tok.encode("a", true)?.first() == Some(&bos) => Some(bos),
        _ => None,
    };
    if ids.len() < 2 {
        bail!(
            "the text encodes to {} tokens{}; give a longer one",
            ids.len(),
            if like_llama { " in whole windows" } else { "" }
        );
    }
    let mut session = engine.session_with_ctx(&model, window)?;
    let vocab = model.hp.n_vocab;
    let ref_engine = match &args.reference {
        Some(path) => Some(Engine::open(
            path,
            SessionOptions {
                target_profile: "none".into(),
                threads: args.threads,
                kv_type: Some(KvType::F32),
                ..SessionOptions::default()
            },
        )?),
        None => None,
    };
    let ref_model = ref_engine.as_ref().map(|e| e.load_model()).transpose()?;
    if let Some(m) = &ref_model {
        if m.hp.n_vocab != vocab {
            bail!(
                "the reference has {} tokens in its vocabulary, this model {vocab}: not the same model",
                m.hp.n_vocab
            );
        }
    }
    let mut ref_session = match (&ref_engine, &ref_model) {
        (Some(e), Some(m)) => Some(e.session_with_ctx(m, window)?),
        _ => None,
    };
    let (mut kl_sum, mut kl_max, mut kl_n, mut top1_same) = (0f64, 0f64, 0usize, 0usize);
    let (mut nll, mut scored) = (0f64, 0usize);
    let mut argmax = Vec::with_capacity(ids.len());
    let t0 = std::time::Instant::now();
    for chunk in ids.chunks(window) {
        session.reset();
        if let Some(r) = ref_session.as_mut() {
            r.reset();
        }
        for (i, &t) in chunk.iter().enumerate() {
            let t = match window_bos {
                Some(bos) if i == 0 => bos,
                _ => t,
            };
            let logits = session.forward(&[t], false)?;
            argmax.push(crate::sampling::argmax_logits(&logits[..vocab]));
            let ref_logits = match ref_session.as_mut() {
                Some(r) => Some(r.forward(&[t], false)?),
                None => None,
            };
            if i < first_scored {
                continue;
            }
            if let Some(p) = &ref_logits {
                let kl = kl_divergence(&p[..vocab], &logits[..vocab]);
                kl_sum += kl;
                kl_max = kl_max.max(kl);
                kl_n += 1;
                top1_same += (crate::sampling::argmax_logits(&p[..vocab])
                    == crate::sampling::argmax_logits(&logits[..vocab]))
                    as usize;
            }
            if let Some(&next) = chunk.get(i + 1) {
                let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = max
                    + logits
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                nll += lse - logits[next as usize] as f64;
                scored += 1;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "file_bytes": file.bytes().len(),
        "tokens": ids.len(),
        "scored": scored,
        "protocol": if like_llama { "llama-perplexity" } else { "all positions" },
        "nll": nll / scored.max(1) as f64,
        "perplexity": (nll / scored.max(1) as f64).exp(),
        "seconds": secs,
        "argmax": argmax,
        "reference": args.reference.as_ref().map(|r| serde_json::json!({
            "model": r.display().to_string(),
            "positions": kl_n,
            "mean_kl": kl_sum / kl_n.max(1) as f64,
            "max_kl": kl_max,
            "top1_agreement": top1_same as f64 / kl_n.max(1) as f64,
        })),
        "expert_bytes_per_token": session.expert_bytes_used() as f64 / ids.len() as f64,
        "expert_cache": session.expert_cache().map(|c| c.stats()),
        "peak_rss_bytes": super::bench::peak_rss_bytes(),
        "lossy_routing": (!engine.options().streaming.route.is_off())
            .then(|| session.lossy_stats().clone()),
    });
    writeln!(out, "{report}")?;
    Ok(())
}

/// KL(p || q) in nats between the softmax distributions of two logit vectors.
fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        x.iter().map(|&v| v as f64 - lse).collect()
    };
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::kl_divergence;

    #[test]
    fn kl_of_known_distributions() {
        assert_eq!(kl_divergence(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        // Shifting every logit leaves the distribution alone.
        assert!(kl_divergence(&[1.0, 2.0, 3.0], &[11.0, 12.0, 13.0]) < 1e-12);
        // p = (1/2, 1/2), q = (1/5, 4/5): KL = 0.5 ln(2.5) + 0.5 ln(0.625).
        let want = 0.5 * 2.5f64.ln() + 0.5 * 0.625f64.ln();
        let got = kl_divergence(&[0.0, 0.0], &[0.0, 4f32.ln()]);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
