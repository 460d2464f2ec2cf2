//! The `moe-run` command line: one-shot generation and logits dumps. Lives in the library so
//! the end-to-end tests can drive it in-process.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use crate::engine::{generate, Engine, Request, SessionOptions};
use crate::model::KvType;
use crate::sampling::{Sampler, SamplerConfig};
use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod args;
mod bench;
mod eval;
mod kernel_bench;
mod trace;

use args::{parse_kv_type, StreamingArgs};

#[derive(Parser, Debug)]
#[command(
    name = "moe-run",
    version,
    about = "Run a Mixture-of-Experts GGUF model on the CPU",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    generate: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure prompt processing and generation speed (like llama-bench)
    Bench(bench::BenchArgs),
    /// Measure the matrix-product kernels on MoE-layer shapes (random weights)
    BenchKernels(kernel_bench::KernelBenchArgs),
    /// Perplexity and next-token choices over a text, decoded token by token
    Eval(eval::EvalArgs),
    /// Write every MoE layer's routing decisions for a text as .npy arrays (distillation data)
    Trace(trace::TraceArgs),
}

#[derive(clap::Args, Debug)]
struct Args {
    /// Model file (GGUF, as written by moe-convert)
    #[arg(short = 'm', long, required = true)]
    model: Option<PathBuf>,
    /// Prompt text
    #[arg(short = 'p', long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Prompt as token ids instead of text, e.g. 1,2,3
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// Number of tokens to generate
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    n_predict: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    /// Keep the k most likely tokens (0 = off)
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off)
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than min_p times the best one (0 = off)
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1 = off)
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repeat penalty considers
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (default: from the clock)
    #[arg(short = 's', long)]
    seed: Option<u64>,
    /// Worker threads (default: all cores)
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Context length (default: the smaller of the model's and 4096)
    #[arg(short = 'c', long)]
    ctx: Option<usize>,
    /// Print the generated token ids as one JSON array line at the end
    #[arg(long)]
    ids: bool,
    /// Write the logits of every prompt position to this .npy file (float32, [n_prompt, vocab])
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    /// Do not stop at end-of-generation tokens
    #[arg(long)]
    ignore_eos: bool,
    /// Print run statistics (expert cache, predictions) as one JSON line on stderr at the end
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    streaming: StreamingArgs,
    /// KV cache type: f16 (half the memory) or f32 [default: f16, or the board profile's]
    #[arg(long, value_parser = parse_kv_type)]
    kv_type: Option<KvType>,
    /// Board profile giving the defaults of threads, memory budget and expert streaming: auto
    /// (detect the CPU and RAM), none, pi5, pi4, zero2w, generic-aarch64, x86_64 or a .toml
    /// file; NAME:STORAGE names the model's device (e.g. pi4:usb-ssd). Flags still win
    #[arg(long, default_value = "auto")]
    target_profile: String,
}

/// Runs `moe-run` with command-line `argv` (program name first), writing generated text to `out`
/// and diagnostics to `err`.
pub fn run(
    argv: impl IntoIterator<Item = OsString>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    // `--version` names the kernel table too: which one runs depends on the CPU and on
    // `MOE_EDGE_ISA`/`MOE_EDGE_SCALAR`, and a benchmark should say which it measured.
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let version = VERSION.get_or_init(|| {
        format!(
            "{} (kernels: {})",
            env!("CARGO_PKG_VERSION"),
            crate::tensor::kernels::best().name
        )
    });
    let matches = Cli::command()
        .version(version.as_str())
        .try_get_matches_from(argv)?;
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Some(Command::Bench(b)) => bench::run(b, out, err),
        Some(Command::BenchKernels(b)) => kernel_bench::run(b, out),
        Some(Command::Eval(e)) => eval::run(e, out, err),
        Some(Command::Trace(t)) => trace::run(t, out, err),
        None => generate_text(cli.generate, out, err),
    }
}

/// A command that reads text cannot run without a tokenizer: what to do instead. `alternative`
/// is the command's own way around it, if it has one.
fn needs_tokenizer(
    e: crate::tokenizer::TokenizerError,
    what: &str,
    alternative: &str,
) -> anyhow::Error {
    anyhow::anyhow!(
        "{e}. {what} reads a text, so it needs a tokenizer moe-run can run: convert the model's \
         Hugging Face checkpoint with moe-convert, which embeds its tokenizer.json{alternative}"
    )
}

fn generate_text(mut args: Args, out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let model_path = args.model.clone().context("-m MODEL is required")?;
    let engine = Engine::open(
        &model_path,
        SessionOptions {
            target_profile: args.target_profile.clone(),
            threads: args.threads,
            n_ctx: args.ctx,
            kv_type: args.kv_type,
            streaming: args.streaming.options(),
            extra_sequences: 0,
            profiling: false,
        },
    )?;
    let model = engine.load_model()?;
    let tokenizer = engine.tokenizer();

    let prompt: Vec<u32> = match (&args.tokens, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => tokenizer
            .as_ref()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot turn the prompt into tokens: {e}. The model itself can still run: \
                     give the prompt as token ids, --tokens 1,2,3 (made with the model's own \
                     tokenizer, e.g. transformers or llama.cpp's llama-tokenize), and --ids to \
                     get the generated ids"
                )
            })?
            .encode(text, true)?,
        (None, None) => match tokenizer.as_ref().ok().and_then(|t| t.bos()) {
            Some(bos) => vec![bos],
            None => bail!("give a prompt with -p TEXT or --tokens IDS"),
        },
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens; give a longer prompt or --tokens");
    }
    let n_ctx = engine
        .context_length(&model)
        .max(prompt.len() + args.n_predict);
    let mut session = engine.session_with_ctx(&model, n_ctx)?;
    writeln!(err, "{}", engine.startup_line(&session))?;

    if let Some(path) = &args.dump_logits {
        let logits = session.forward(&prompt, true)?;
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        crate::npy::write_f32_2d(
            std::io::BufWriter::new(f),
            logits,
            prompt.len(),
            model.hp.n_vocab,
        )?;
        writeln!(
            err,
            "wrote logits [{}, {}] to {}",
            prompt.len(),
            model.hp.n_vocab,
            path.display()
        )?;
        session.reset();
    }
    if args.n_predict == 0 {
        return Ok(());
    }

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed,
    });

    if let Err(e) = &tokenizer {
        // Without a tokenizer there is no text to show, so the ids are the output.
        writeln!(
            err,
            "note: {e}; the generated tokens are printed as ids instead of text"
        )?;
        args.ids = true;
    }
    if let Some(text) = &args.prompt {
        write!(out, "{text}")?;
        out.flush()?;
    }
    let mut generated = Vec::new();
    let request = Request {
        prompt: &prompt,
        cached: 0,
        max_tokens: args.n_predict,
        stop: &[],
        ignore_eos: args.ignore_eos,
        skip_special: false,
        top_logprobs: None,
        constraint: None,
    };
    let stats = generate(
        &mut session,
        &mut sampler,
        tokenizer.as_ref().ok(),
        &request,
        |piece| {
            generated.extend(piece.id);
            let _ = write!(out, "{}", piece.text);
            let _ = out.flush();
            true
        },
    )?;
    writeln!(out)?;
    if args.ids {
        writeln!(out, "{}", serde_json::to_string(&generated)?)?;
    }
    let secs = |d: std::time::Duration| d.as_secs_f64().max(1e-9);
    writeln!(
        err,
        "prompt: {} tokens, {:.1} t/s | generation: {} tokens, {:.1} t/s | kernels: {}",
        stats.prompt_tokens,
        stats.prompt_tokens as f64 / secs(stats.prompt_time),
        stats.generated_tokens,
        stats.generated_tokens as f64 / secs(stats.generation_time),
        crate::tensor::kernels::best().name
    )?;
    if args.stats {
        let report = serde_json::json!({
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prompt_seconds": stats.prompt_time.as_secs_f64(),
            "generation_seconds": stats.generation_time.as_secs_f64(),
            "expert_bytes_used": session.expert_bytes_used(),
            "expert_cache": session.expert_cache().map(|c| c.stats()),
            "predictions": session.prediction_stats(),
            "lossy_routing": (!engine.options().streaming.route.is_off())
                .then(|| session.lossy_stats().clone()),
            "pinned_slots": session.expert_cache().map_or(0, |c| c.kept_resident()),
            "predictor": session.predictor_stats(),
            "peak_rss_bytes": bench::peak_rss_bytes(),
            "kv_cache_bytes": session.kv_bytes(),
            "recurrent_state_bytes": session.recurrent_bytes(),
        });
        writeln!(err, "{report}")?;
    }
    Ok(())
}
