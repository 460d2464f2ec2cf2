//! moe-run: one-shot generation and logits dumps.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use moe_runtime::generate::generate;
use moe_runtime::gguf::GgufFile;
use moe_runtime::model::{Model, Session};
use moe_runtime::sampling::{Sampler, SamplerConfig};
use moe_runtime::tokenizer::Tokenizer;

#[derive(Parser, Debug)]
#[command(
    name = "moe-run",
    version,
    about = "Run a Mixture-of-Experts GGUF model on the CPU"
)]
struct Args {
    /// Model file (GGUF, as written by moe-convert)
    #[arg(short = 'm', long)]
    model: PathBuf,
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
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
            .context("setting up the thread pool")?;
    }
    let file = GgufFile::open(&args.model)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let model = Model::load(&file).with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = Tokenizer::from_gguf(file.header());

    let prompt: Vec<u32> = match (&args.tokens, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => tokenizer
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .encode(text, true)?,
        (None, None) => match tokenizer.as_ref().ok().and_then(|t| t.bos()) {
            Some(bos) => vec![bos],
            None => bail!("give a prompt with -p TEXT or --tokens IDS"),
        },
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens; give a longer prompt or --tokens");
    }
    let n_ctx = args
        .ctx
        .unwrap_or_else(|| model.hp.n_ctx_train.min(4096))
        .max(prompt.len() + args.n_predict);
    let mut session = Session::new(&model, n_ctx);

    if let Some(path) = &args.dump_logits {
        let logits = session.forward(&prompt, true)?;
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        moe_runtime::npy::write_f32_2d(
            std::io::BufWriter::new(f),
            logits,
            prompt.len(),
            model.hp.n_vocab,
        )?;
        eprintln!(
            "wrote logits [{}, {}] to {}",
            prompt.len(),
            model.hp.n_vocab,
            path.display()
        );
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

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut stream = tokenizer.as_ref().ok().map(|t| t.stream(false));
    if let (Some(tok), Some(text)) = (tokenizer.as_ref().ok(), &args.prompt) {
        let _ = tok;
        write!(out, "{text}")?;
        out.flush()?;
    }
    let mut generated = Vec::new();
    let tok_ref = tokenizer.as_ref().ok();
    let stats = generate(
        &mut session,
        &mut sampler,
        &prompt,
        args.n_predict,
        |id| !args.ignore_eos && tok_ref.is_some_and(|t| t.is_end_of_generation(id)),
        |id| {
            generated.push(id);
            if let Some(s) = stream.as_mut() {
                if let Ok(text) = s.push(id) {
                    let _ = write!(out, "{text}");
                    let _ = out.flush();
                }
            }
            true
        },
    )?;
    writeln!(out)?;
    if args.ids {
        writeln!(out, "{}", serde_json::to_string(&generated)?)?;
    }
    let secs = |d: std::time::Duration| d.as_secs_f64().max(1e-9);
    eprintln!(
        "prompt: {} tokens, {:.1} t/s | generation: {} tokens, {:.1} t/s | kernels: {}",
        stats.prompt_tokens,
        stats.prompt_tokens as f64 / secs(stats.prompt_time),
        stats.generated_tokens,
        stats.generated_tokens as f64 / secs(stats.generation_time),
        moe_runtime::tensor::kernels::best().name
    );
    Ok(())
}
