//! `moe-run trace`: every MoE layer's routing decisions for a text, written as `.npy` arrays
//! (the distillation data of a pre-gating router, and routing statistics).
//!
//! The text is tokenized once and cut into windows of `--window` tokens; each window runs as
//! one batch from an empty KV cache (as the model was trained), so every token's routing sees
//! at most `--window` tokens of context. Outputs, with `n` tokens, `L` MoE layers, `E` experts
//! and top-`k` routing:
//!
//! - `PREFIX.tokens.npy`  int32 `[n]`: the token ids;
//! - `PREFIX.experts.npy` int32 `[n, L, k]`: each layer's chosen experts, best first;
//! - `PREFIX.probs.npy`   float16 `[n, L, E]`: softmax of each layer's router logits (unless
//!   `--no-probs`);
//! - `PREFIX.json`: shapes, window, layer indices and the model path.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::engine::{Engine, SessionOptions};

#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    /// Model file (GGUF)
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Text file to trace (UTF-8)
    #[arg(long)]
    text: PathBuf,
    /// Output prefix: writes PREFIX.tokens.npy, PREFIX.experts.npy, PREFIX.probs.npy, PREFIX.json
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Tokens per window; each window starts from an empty KV cache (default: the model's
    /// training context, at most 512)
    #[arg(long)]
    window: Option<usize>,
    /// Stop after this many tokens
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Do not write the router probabilities (they take n * layers * experts * 2 bytes)
    #[arg(long)]
    no_probs: bool,
    /// Worker threads (default: all cores)
    #[arg(short = 't', long)]
    threads: Option<usize>,
}

pub fn run(args: TraceArgs, _out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let engine = Engine::open(
        &args.model,
        SessionOptions {
            target_profile: "none".into(),
            threads: args.threads,
            ..SessionOptions::default()
        },
    )?;
    let model = engine.load_model()?;
    let tokenizer = engine
        .tokenizer()
        .map_err(|e| super::needs_tokenizer(e, "trace", ""))?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let mut tokens = tokenizer.encode(&text, false)?;
    if let Some(m) = args.max_tokens {
        tokens.truncate(m);
    }
    if tokens.is_empty() {
        bail!("{} encodes to no tokens", args.text.display());
    }
    let hp = &model.hp;
    let window = args.window.unwrap_or(hp.n_ctx_train.min(512)).max(1);
    let moe_layers = model.moe_layers();
    if moe_layers.is_empty() {
        bail!("{} has no MoE layers to trace", args.model.display());
    }
    let (n, nl, ne, k) = (
        tokens.len(),
        moe_layers.len(),
        hp.n_expert,
        hp.n_expert_used,
    );
    let mut experts = vec![0i32; n * nl * k];
    let mut probs = if args.no_probs {
        Vec::new()
    } else {
        vec![0f32; n * nl * ne]
    };

    let mut session = engine.session_with_ctx(&model, window)?;
    session.set_route_tracing(true);
    let t0 = std::time::Instant::now();
    for (w, chunk) in tokens.chunks(window).enumerate() {
        session.reset();
        session.forward(chunk, false)?;
        let base = w * window;
        for rec in session.take_route_trace() {
            let li = moe_layers
                .iter()
                .position(|&l| l == rec.layer)
                .expect("traced layers are MoE layers");
            for (t, r) in rec.routes.iter().enumerate() {
                let tok = base + t;
                let dst = &mut experts[(tok * nl + li) * k..(tok * nl + li + 1) * k];
                for (d, &e) in dst.iter_mut().zip(&r.experts) {
                    *d = e as i32;
                }
                if !probs.is_empty() {
                    softmax_into(
                        &rec.logits[t * ne..(t + 1) * ne],
                        &mut probs[(tok * nl + li) * ne..(tok * nl + li + 1) * ne],
                    );
                }
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();

    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    write_npy(&args.out, "tokens", |w| {
        crate::npy::write_i32(w, &ids, &[n])
    })?;
    write_npy(&args.out, "experts", |w| {
        crate::npy::write_i32(w, &experts, &[n, nl, k])
    })?;
    if !probs.is_empty() {
        write_npy(&args.out, "probs", |w| {
            crate::npy::write_f16(w, &probs, &[n, nl, ne])
        })?;
    }
    let meta = serde_json::json!({
        "model": args.model.display().to_string(),
        "text": args.text.display().to_string(),
        "tokens": n,
        "window": window,
        "moe_layers": moe_layers,
        "n_expert": ne,
        "n_expert_used": k,
        "probs": !probs.is_empty(),
    });
    let meta_path = with_suffix(&args.out, "json");
    std::fs::write(&meta_path, serde_json::to_string_pretty(&meta)?)
        .with_context(|| format!("writing {}", meta_path.display()))?;
    writeln!(
        err,
        "traced {n} tokens ({} windows of {window}) through {nl} MoE layers in {secs:.1} s ({:.0} t/s) -> {}.*",
        n.div_ceil(window),
        n as f64 / secs.max(1e-9),
        args.out.display()
    )?;
    Ok(())
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

fn write_npy(
    prefix: &Path,
    name: &str,
    body: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let path = with_suffix(prefix, &format!("{name}.npy"));
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    body(&mut w).with_context(|| format!("writing {}", path.display()))?;
    w.flush()?;
    Ok(())
}

fn softmax_into(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = (l - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}
