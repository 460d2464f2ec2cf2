//! `moe-run bench`: prompt-processing and generation speed with llama-bench's definitions.
//!
//! pp N: N tokens evaluated as one batch from an empty cache; tg N: N tokens decoded one at a
//! time from an empty cache. Each test runs once to warm up, then `--repetitions` times; the
//! figures are the mean and standard deviation of the per-run tokens per second.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::args::StreamingArgs;
use crate::engine::{Engine, PredictorChoice, SessionOptions, StreamingOptions};
use crate::model::{Model, Session};
use crate::moe::cache::ExpertKey;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Model file (GGUF)
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Prompt tokens for the prompt-processing test (0 skips it)
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    n_prompt: usize,
    /// Tokens for the generation test (0 skips it)
    #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
    n_gen: usize,
    /// Measured repetitions of each test
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    /// Worker threads (default: all cores)
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Time the phases of the forward pass (attention, routing, experts, ...) and print where
    /// the time goes
    #[arg(long)]
    profile: bool,
    /// Decode this text (teacher-forced, one token at a time, consecutive slices per
    /// repetition) in the generation test instead of the model's greedy continuation of
    /// pseudo-random tokens: routing, and so caching and prediction, follow real text
    #[arg(long)]
    text: Option<PathBuf>,
    /// What the generation test feeds back without --text: `greedy`, the model's own choice
    /// (as generation does), or `random`, a pseudo-random token at every step, as llama-bench
    /// does. A random-weight model's greedy output soon repeats one token, whose routing then
    /// repeats too and stays cached: compare streaming with llama-bench on such a file with
    /// `random`
    #[arg(long, value_enum, default_value = "greedy")]
    gen_tokens: GenTokens,
    #[command(flatten)]
    streaming: StreamingArgs,
    /// Board profile for the defaults of threads and expert streaming (see moe-run --help);
    /// off by default so that measurements use only the flags given
    #[arg(long, default_value = "none")]
    target_profile: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum GenTokens {
    Greedy,
    Random,
}

#[derive(Serialize)]
struct TestResult {
    test: String,
    n_tokens: usize,
    tokens_per_second_mean: f64,
    tokens_per_second_stddev: f64,
    samples: Vec<f64>,
    /// Routed-expert weight bytes used per token (each selected expert once per batch).
    expert_bytes_per_token: f64,
    /// All weight bytes read per token: the used experts, and the other matrices once per
    /// batch. Times tokens/s, this is the memory traffic to hold against the machine's
    /// bandwidth (`moe-run bench-kernels` measures it).
    weight_bytes_per_token: f64,
    /// With an expert cache: its counters over the measured runs.
    cache: Option<CacheDelta>,
    /// With --profile: milliseconds per token in each phase over the measured runs.
    profile: Option<Vec<PhaseTime>>,
}

#[derive(Serialize)]
struct PhaseTime {
    phase: &'static str,
    ms_per_token: f64,
    share: f64,
}

/// Expert-cache figures over the measured repetitions, per token.
#[derive(Serialize)]
struct CacheDelta {
    hit_rate: f64,
    bytes_read_per_token: f64,
    demand_bytes_read_per_token: f64,
    stall_seconds_per_token: f64,
    prefetch_precision: f64,
    evictions_per_token: f64,
}

/// Over the whole run (warm-up included): reads against Belady's offline optimum for the same
/// number of slots, i.e. the misses no policy could avoid.
#[derive(Serialize)]
struct OptimumReport {
    requests: usize,
    actual_misses: u64,
    optimal_misses: usize,
    bytes_read: u64,
    optimal_bytes: u64,
}

#[derive(Serialize)]
struct Report {
    optimum: Option<OptimumReport>,
    model: String,
    file_bytes: u64,
    architecture: String,
    threads: usize,
    kernels: &'static str,
    /// The start-up line: CPU, kernels, RAM, board profile, expert cache.
    setup: String,
    kv_cache_bytes: usize,
    /// Recurrent layers' state (short convolutions, Gated DeltaNets, Mamba-2): fixed per
    /// sequence.
    recurrent_state_bytes: usize,
    peak_rss_bytes: Option<u64>,
    tests: Vec<TestResult>,
    /// What the lossy routing options did (None when they are off).
    lossy: Option<crate::moe::lossy::LossyStats>,
    /// Expert-cache slots pinned to hot experts (--pin-hot).
    pinned_slots: usize,
    /// Lookahead gate quality per depth and the token-level predictor's, over the whole run.
    predictions: Vec<crate::model::PredictionStats>,
    predictor: Option<crate::model::PredictionStats>,
    /// Experts read as soon as their layer's router ran on the layer input (SmallThinker), against
    /// those then used; None when the model has no such router, nothing streams or it is off.
    router_prefetch: Option<crate::model::PredictionStats>,
    /// Resident memory the token-level predictor added when it was loaded.
    predictor_rss_bytes: Option<u64>,
}

pub fn run(args: BenchArgs, out: &mut dyn Write, _err: &mut dyn Write) -> Result<()> {
    let engine = Engine::open(
        &args.model,
        SessionOptions {
            target_profile: args.target_profile.clone(),
            threads: args.threads,
            n_ctx: Some((args.n_prompt.max(args.n_gen) + 1).max(16)),
            kv_type: Some(crate::model::KvType::F16),
            streaming: StreamingOptions {
                predictor: PredictorChoice::None,
                ..args.streaming.options()
            },
            extra_sequences: 0,
            profiling: args.profile,
        },
    )?;
    let file = engine.file();
    let model = engine.load_model()?;
    let mut session = engine.session(&model)?;
    let setup = engine.startup_line(&session);
    let rss0 = current_rss_bytes();
    session.set_predictor(
        args.streaming
            .options()
            .predictor(&model, &args.model)
            .map_err(anyhow::Error::from)?,
    );
    let predictor_rss_bytes = current_rss_bytes()
        .zip(rss0)
        .map(|(a, b)| a.saturating_sub(b));
    let text_tokens = match &args.text {
        Some(path) => {
            let tok = engine
                .tokenizer()
                .map_err(|e| super::needs_tokenizer(e, "bench --text", ", or leave out --text"))?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let ids = tok.encode(&text, false)?;
            if ids.len() < (args.repetitions + 1) * args.n_gen {
                anyhow::bail!(
                    "{} has {} tokens, the generation test needs {} (repetitions + 1 warm-up, times --n-gen)",
                    path.display(),
                    ids.len(),
                    (args.repetitions + 1) * args.n_gen
                );
            }
            Some(ids)
        }
        None => None,
    };
    let vocab = model.hp.n_vocab as u32;
    // Deterministic pseudo-random token ids, like llama-bench's random prompt.
    let tokens: Vec<u32> = (0..args.n_prompt.max(args.n_gen))
        .map(|i| pseudo_random_token(i, vocab))
        .collect();

    if let Some(c) = session.expert_cache() {
        c.record_trace();
    }
    let dense_bytes = dense_weight_bytes(&model) as f64;
    let mut tests = Vec::new();
    if args.n_prompt > 0 {
        tests.push(measure(
            "pp",
            args.n_prompt,
            args.repetitions,
            &mut session,
            |s| s.forward(&tokens[..args.n_prompt], false).map(|_| ()),
        )?);
    }
    let rep_counter = std::cell::Cell::new(0usize);
    if args.n_gen > 0 {
        tests.push(measure(
            "tg",
            args.n_gen,
            args.repetitions,
            &mut session,
            |s| {
                if let Some(text) = &text_tokens {
                    let r = rep_counter.get();
                    rep_counter.set(r + 1);
                    for &t in &text[r * args.n_gen..(r + 1) * args.n_gen] {
                        s.forward(&[t], false)?;
                    }
                    return Ok(());
                }
                if args.gen_tokens == GenTokens::Random {
                    // A new stretch of pseudo-random ids per repetition (llama-bench draws
                    // std::rand() at every step).
                    let r = rep_counter.get();
                    rep_counter.set(r + 1);
                    for t in random_gen_tokens(r, args.n_gen, vocab) {
                        s.forward(&[t], false)?;
                    }
                    return Ok(());
                }
                // Each repetition starts from another token and then feeds back the model's own
                // greedy choice, as generation does (so routing, and caching, follow real text
                // rather than repeating one fixed sequence).
                let start = tokens[rep_counter.get() % tokens.len()];
                rep_counter.set(rep_counter.get() + 7);
                let mut t = start;
                for _ in 0..args.n_gen {
                    t = crate::sampling::argmax_logits(s.forward(&[t], false)?);
                }
                Ok(())
            },
        )?);
    }
    for t in &mut tests {
        // pp runs the prompt as one batch; tg one token per forward pass.
        let batch = if t.test == "pp" { t.n_tokens } else { 1 };
        t.weight_bytes_per_token = t.expert_bytes_per_token + dense_bytes / batch as f64;
    }
    let optimum = session.expert_cache().map(|c| {
        let trace = c.trace();
        let stats = c.stats();
        let layout = c.layout();
        let bytes_of = |k: ExpertKey| layout.expert_bytes(k.layer as usize, k.expert as usize);
        let (optimal_misses, optimal_bytes) =
            crate::moe::cache::optimal_reads(&trace, c.slots(), bytes_of);
        OptimumReport {
            requests: trace.len(),
            actual_misses: stats.demand_misses + stats.late_prefetches,
            optimal_misses,
            bytes_read: stats.bytes_read,
            optimal_bytes,
        }
    });
    let report = Report {
        optimum,
        model: args.model.display().to_string(),
        file_bytes: file.bytes().len() as u64,
        architecture: model.hp.arch.gguf_name().to_string(),
        threads: rayon::current_num_threads(),
        kernels: crate::tensor::kernels::best().name,
        setup,
        kv_cache_bytes: session.kv_bytes(),
        recurrent_state_bytes: session.recurrent_bytes(),
        peak_rss_bytes: peak_rss_bytes(),
        tests,
        lossy: (!engine.options().streaming.route.is_off()).then(|| session.lossy_stats().clone()),
        pinned_slots: session.expert_cache().map_or(0, |c| c.kept_resident()),
        predictions: session.prediction_stats().to_vec(),
        predictor: session.predictor_stats().cloned(),
        router_prefetch: (model.hp.traits.router_input == crate::model::RouterInput::LayerInput
            && session.router_prefetch()
            && session.expert_cache().is_some())
        .then(|| session.router_prefetch_stats().clone()),
        predictor_rss_bytes,
    };
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "model: {} ({:.1} MiB, {}), threads: {}, kernels: {}",
        report.model,
        report.file_bytes as f64 / (1u64 << 20) as f64,
        report.architecture,
        report.threads,
        report.kernels
    )?;
    writeln!(out, "{}", report.setup)?;
    writeln!(
        out,
        "| test  |            t/s | expert MiB/token | weight MiB/token | weight GB/s |"
    )?;
    writeln!(
        out,
        "| ----- | -------------- | ---------------- | ---------------- | ----------- |"
    )?;
    for t in &report.tests {
        writeln!(
            out,
            "| {:<5} | {:>7.2} ± {:<5.2} | {:>16.2} | {:>16.2} | {:>11.2} |",
            format!("{}{}", t.test, t.n_tokens),
            t.tokens_per_second_mean,
            t.tokens_per_second_stddev,
            t.expert_bytes_per_token / (1u64 << 20) as f64,
            t.weight_bytes_per_token / (1u64 << 20) as f64,
            t.weight_bytes_per_token * t.tokens_per_second_mean / 1e9
        )?;
    }
    for t in &report.tests {
        if let Some(c) = &t.cache {
            writeln!(
                out,
                "{}{} expert cache: hit rate {:.1}%, read {:.2} MiB/token (demand {:.2}), stall {:.1} ms/token, prefetch precision {:.1}%",
                t.test,
                t.n_tokens,
                100.0 * c.hit_rate,
                c.bytes_read_per_token / (1u64 << 20) as f64,
                c.demand_bytes_read_per_token / (1u64 << 20) as f64,
                1e3 * c.stall_seconds_per_token,
                100.0 * c.prefetch_precision
            )?;
        }
    }
    for t in &report.tests {
        if let Some(phases) = &t.profile {
            let parts: Vec<String> = phases
                .iter()
                .map(|p| format!("{} {:.1}%", p.phase, 100.0 * p.share))
                .collect();
            writeln!(out, "{}{} time: {}", t.test, t.n_tokens, parts.join(", "))?;
        }
    }
    if let Some(r) = &report.router_prefetch {
        writeln!(
            out,
            "read at router time: {} experts, {:.1}% of those then used",
            r.predicted,
            100.0 * r.recall()
        )?;
    }
    if let Some(o) = &report.optimum {
        writeln!(
            out,
            "whole run: {} expert requests, {} waited for a read; read {} experts, {:.1} MiB (Belady's offline optimum: {} experts, {:.1} MiB)",
            o.requests,
            o.actual_misses,
            o.bytes_read / o.optimal_bytes.checked_div(o.optimal_misses as u64).unwrap_or(1).max(1),
            o.bytes_read as f64 / (1u64 << 20) as f64,
            o.optimal_misses,
            o.optimal_bytes as f64 / (1u64 << 20) as f64
        )?;
    }
    if let Some(rss) = report.peak_rss_bytes {
        writeln!(
            out,
            "peak RSS: {:.1} MiB (file {:.1} MiB, KV cache {:.1} MiB{})",
            rss as f64 / (1u64 << 20) as f64,
            report.file_bytes as f64 / (1u64 << 20) as f64,
            report.kv_cache_bytes as f64 / (1u64 << 20) as f64,
            match report.recurrent_state_bytes {
                0 => String::new(),
                b => format!(
                    ", recurrent state {:.3} MiB",
                    b as f64 / (1u64 << 20) as f64
                ),
            }
        )?;
    }
    Ok(())
}

/// The ids repetition `rep` of `--gen-tokens random` feeds: `n` pseudo-random ids below
/// `vocab`, a new stretch for every repetition, the same on every run.
fn random_gen_tokens(rep: usize, n: usize, vocab: u32) -> impl Iterator<Item = u32> {
    (rep * n..(rep + 1) * n).map(move |i| pseudo_random_token(i, vocab))
}

/// The `i`-th of bench's deterministic pseudo-random token ids below `vocab`.
fn pseudo_random_token(i: usize, vocab: u32) -> u32 {
    (((i as u64).wrapping_mul(2_654_435_761) >> 7) % u64::from(vocab.max(1))) as u32
}

fn measure(
    name: &str,
    n: usize,
    reps: usize,
    session: &mut Session,
    mut body: impl FnMut(&mut Session) -> Result<(), crate::model::ModelError>,
) -> Result<TestResult> {
    let mut samples = Vec::with_capacity(reps);
    let mut expert_bytes = 0u64;
    let mut before = None;
    for rep in 0..=reps {
        if rep == 1 {
            before = session.expert_cache().map(|c| c.stats());
            session.reset_profile();
        }
        session.reset();
        let bytes0 = session.expert_bytes_used();
        let t0 = Instant::now();
        body(session)?;
        let secs = t0.elapsed().as_secs_f64();
        // Run 0 warms caches and is not counted.
        if rep > 0 {
            samples.push(n as f64 / secs);
            expert_bytes += session.expert_bytes_used() - bytes0;
        }
    }
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>()
        / (samples.len().saturating_sub(1)).max(1) as f64;
    let tokens = (reps.max(1) * n) as f64;
    let cache = match (session.expert_cache().map(|c| c.stats()), before) {
        (Some(a), Some(b)) => {
            let hits = (a.demand_hits - b.demand_hits) as f64;
            let misses = (a.demand_misses - b.demand_misses) as f64;
            let issued = (a.prefetches_issued - b.prefetches_issued) as f64;
            Some(CacheDelta {
                hit_rate: hits / (hits + misses).max(1.0),
                bytes_read_per_token: (a.bytes_read - b.bytes_read) as f64 / tokens,
                demand_bytes_read_per_token: (a.demand_bytes_read - b.demand_bytes_read) as f64
                    / tokens,
                stall_seconds_per_token: (a.stall_seconds - b.stall_seconds) / tokens,
                prefetch_precision: (a.prefetches_used - b.prefetches_used) as f64
                    / issued.max(1.0),
                evictions_per_token: (a.evictions - b.evictions) as f64 / tokens,
            })
        }
        _ => None,
    };
    let profile = session.profile().map(|phases| {
        let total: f64 = phases.iter().map(|(_, secs)| secs).sum();
        phases
            .into_iter()
            .map(|(phase, secs)| PhaseTime {
                phase: phase.name(),
                ms_per_token: 1e3 * secs / tokens,
                share: secs / total.max(1e-12),
            })
            .collect()
    });
    Ok(TestResult {
        profile,
        cache,
        test: name.to_string(),
        n_tokens: n,
        tokens_per_second_mean: mean,
        tokens_per_second_stddev: var.sqrt(),
        samples,
        expert_bytes_per_token: expert_bytes as f64 / (reps.max(1) * n) as f64,
        weight_bytes_per_token: 0.0,
    })
}

/// Weight bytes a forward pass reads besides the routed experts, once per batch: every
/// non-expert tensor except the token embedding, of which it reads one row per token (unless
/// the output projection is that same tensor).
fn dense_weight_bytes(model: &Model) -> usize {
    let file_tensors = model.file.header().tensor_data_bytes();
    let experts = model.expert_layout().total_expert_bytes();
    let tied = std::ptr::eq(model.output.data.as_ptr(), model.tok_embd.data.as_ptr());
    let embedding = if tied { 0 } else { model.tok_embd.data.len() };
    file_tensors - experts - embedding
}

/// The process's peak resident set (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process's current resident set (VmRSS), where the OS reports it.
fn current_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::random_gen_tokens;

    #[test]
    fn random_generation_tokens_differ_per_repetition_and_not_per_run() {
        let vocab = 151_936;
        let a: Vec<u32> = random_gen_tokens(0, 64, vocab).collect();
        let b: Vec<u32> = random_gen_tokens(1, 64, vocab).collect();
        assert_eq!(a.len(), 64);
        assert!(a.iter().chain(&b).all(|&t| t < vocab));
        assert_eq!(a, random_gen_tokens(0, 64, vocab).collect::<Vec<_>>());
        let distinct: std::collections::HashSet<u32> = a.iter().chain(&b).copied().collect();
        assert!(distinct.len() > 120, "{} distinct of 128", distinct.len());
        assert!(random_gen_tokens(3, 8, 1).all(|t| t == 0));
    }
}
