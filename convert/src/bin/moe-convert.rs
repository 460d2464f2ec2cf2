//! moe-convert HF_DIR -o OUT.gguf --type q8_0

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use moe_convert::{convert, Options};
use moe_runtime::gguf::GgmlType;

#[derive(Parser, Debug)]
#[command(
    name = "moe-convert",
    version,
    about = "Convert a Hugging Face MoE checkpoint folder to a page-aligned GGUF file"
)]
struct Args {
    /// Checkpoint folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json)
    hf_dir: PathBuf,
    /// Output GGUF file
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Weight type: f32, f16, bf16, q8_0 or q4_0
    #[arg(short = 't', long = "type", default_value = "q8_0", value_parser = parse_type)]
    ty: GgmlType,
    /// Do not draw a progress bar
    #[arg(long)]
    quiet: bool,
}

fn parse_type(s: &str) -> Result<GgmlType, String> {
    match GgmlType::from_name(s) {
        Some(
            t @ (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0),
        ) => Ok(t),
        _ => Err(format!("`{s}` is not one of f32, f16, bf16, q8_0, q4_0")),
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
            .expect("valid template"),
    );
    let summary = convert(
        &args.hf_dir,
        &args.out,
        Options { ty: args.ty },
        &|done, total, name| {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(name.to_string());
        },
    )
    .with_context(|| format!("converting {}", args.hf_dir.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} arch, {} tensors, {:.2} MiB) in {:.1}s",
        args.out.display(),
        summary.arch,
        summary.n_tensors,
        summary.file_bytes as f64 / (1 << 20) as f64,
        summary.elapsed.as_secs_f64()
    );
    for (ty, bytes) in &summary.bytes_by_type {
        println!("  {ty:>5}: {:.2} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    Ok(())
}
