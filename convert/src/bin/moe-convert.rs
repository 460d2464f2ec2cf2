//! moe-convert HF_DIR -o OUT.gguf --type q8_0

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use moe_convert::{
    convert, CalibOptions, ConvertOptions, ExpertTypes, Mix, PregateSidecar, PruneSpec, Tuning,
};
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
    /// Weight type: f32, f16, bf16, q8_0 or q4_0 for every weight; q3_k, q4_k or q5_k for every
    /// weight llama-quantize quantizes (with its fallbacks for rows that are not whole
    /// super-blocks); or one of llama.cpp's mixes, with llama-quantize's per-tensor types and
    /// bytes: q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, iq4_nl,
    /// iq4_xs (docs/FILE_FORMAT.md has the table)
    #[arg(short = 't', long = "type", default_value = "q8_0", value_parser = parse_type)]
    ty: TypeChoice,
    /// llama.cpp's importance matrix (`llama-imatrix -o FILE.gguf`) to weight the k-quant and
    /// IQ4 encoders' errors by, as `llama-quantize --imatrix` does. With --calib, this file's
    /// weights are used instead of the collected ones
    #[arg(long, value_name = "FILE.gguf")]
    imatrix: Option<PathBuf>,
    /// Write the importance matrix --calib collects here, in llama-imatrix's GGUF format
    /// (`llama-quantize --imatrix` reads it)
    #[arg(long, value_name = "FILE.gguf")]
    imatrix_out: Option<PathBuf>,
    /// Do not draw a progress bar
    #[arg(long)]
    quiet: bool,
    /// Calibration text: run the model over it and store per-expert statistics (selection
    /// frequency, router mass, co-activation, output error when dropped) in the file, and print
    /// them per layer; with a k-quant mix (--type q4_k_m ...), the importance matrix collected
    /// over it weights the encoders, as llama-imatrix + llama-quantize --imatrix would
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Use at most this many tokens of the calibration text
    #[arg(long, default_value_t = 8192)]
    calib_tokens: usize,
    /// Tokens per calibration window, each run from an empty context (llama-imatrix's -c)
    #[arg(long, default_value_t = 256)]
    calib_window: usize,
    /// Measure each expert's output error (KL when dropped) on this many tokens (0 = skip)
    #[arg(long, default_value_t = 256)]
    calib_kl_tokens: usize,
    /// Write the calibration statistics as JSON here (scripts/analysis/plot_calib.py draws them)
    #[arg(long)]
    calib_json: Option<PathBuf>,
    /// Remove experts: top:N (the N most used per layer), mass:F (the most used experts
    /// covering fraction F of the router mass; the same count in every layer), or
    /// drop:L:E,L:E,... (exactly these; every layer must lose the same number). The file stays
    /// llama.cpp-compatible
    #[arg(long, value_parser = PruneSpec::parse)]
    prune_experts: Option<PruneSpec>,
    /// Per-expert types from calibration, e.g. hot=q8_0,cold=q4_0 (moe-edge's per-expert
    /// layout, which llama.cpp does not load)
    #[arg(long)]
    expert_types: Option<String>,
    /// Share of each layer's experts (the most used) that get the hot type
    #[arg(long, default_value_t = 0.25)]
    hot_fraction: f64,
    /// Choose each routed expert matrix's type (Q2_K ... Q8_0) to lose the least within this
    /// file size (e.g. 120MiB, 1.5GB) or bits per weight (3.5bpw), from the calibration
    /// statistics and importance matrix of --calib (needed; --imatrix FILE replaces the
    /// matrix); the other tensors take --type (a mix such as q4_k_m: llama-quantize's types).
    /// Writes moe-edge's per-expert layout unless --stacked-types
    #[arg(long, value_name = "SIZE", value_parser = moe_convert::budget::Target::parse)]
    target_size: Option<moe_convert::budget::Target>,
    /// With --target-size: one type per stacked expert tensor (all experts of a layer's gate,
    /// up or down alike), so that llama.cpp loads the file
    #[arg(long, requires = "target_size")]
    stacked_types: bool,
    /// With --target-size: no expert matrix above this type's bits per weight (e.g. q5_k). The
    /// expert cache's slots are as large as the largest expert, so this keeps as many experts
    /// in a streaming cache as a file of that type
    #[arg(long, requires = "target_size", value_parser = parse_expert_cap)]
    max_expert_type: Option<GgmlType>,
    /// A pre-gating router network (ONNX, from scripts/train/train_pregate.py) for this model: the
    /// GGUF names it (`moe_edge.pregate.onnx`) and it is copied beside the output when it is
    /// not there, so `moe-run --predictor pregate` finds it without --pregate
    #[arg(long, value_name = "FILE.onnx")]
    pregate: Option<PathBuf>,
}

/// A single type for every weight, or a llama.cpp mix.
#[derive(Clone, Copy, Debug)]
struct TypeChoice {
    ty: GgmlType,
    mix: Option<Mix>,
}

fn parse_type(s: &str) -> Result<TypeChoice, String> {
    if let Some(mix) = Mix::from_name(s) {
        return Ok(TypeChoice {
            ty: mix.default_type(),
            mix: Some(mix),
        });
    }
    match GgmlType::from_name(s) {
        Some(
            t @ (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0),
        ) => Ok(TypeChoice { ty: t, mix: None }),
        _ => {
            let mixes: Vec<&str> = moe_convert::mix::MIX_NAMES.iter().map(|m| m.0).collect();
            Err(format!(
                "`{s}` is not one of f32, f16, bf16, q8_0, q4_0, {}",
                mixes.join(", ")
            ))
        }
    }
}

fn parse_expert_cap(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s)
        .filter(|t| moe_convert::budget::CANDIDATES.contains(t))
        .ok_or_else(|| {
            let names: Vec<&str> = moe_convert::budget::CANDIDATES
                .iter()
                .map(|t| t.name())
                .collect();
            format!("`{s}` is not one of {}", names.join(", "))
        })
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
    let expert_types = args
        .expert_types
        .as_deref()
        .map(|s| ExpertTypes::parse(s, args.hot_fraction))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--expert-types: {e}"))?;
    if !(0.0..=1.0).contains(&args.hot_fraction) {
        anyhow::bail!("--hot-fraction must be between 0 and 1");
    }
    let tuning = Tuning {
        calib: args.calib.clone().map(|text| CalibOptions {
            text,
            max_tokens: args.calib_tokens,
            kl_tokens: args.calib_kl_tokens,
            window: args.calib_window,
        }),
        prune: args.prune_experts.clone(),
        expert_types,
        target: args.target_size.map(|t| {
            let g = if args.stacked_types {
                moe_convert::budget::Granularity::Stacked
            } else {
                moe_convert::budget::Granularity::PerExpert
            };
            (t, g)
        }),
        max_expert_type: args.max_expert_type,
    };
    let progress = |done, total, name: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(name.to_string());
    };
    let pregate = args
        .pregate
        .as_deref()
        .map(|p| PregateSidecar::new(&args.out, p))
        .transpose()?;
    let opts = ConvertOptions {
        extra_metadata: pregate.iter().map(PregateSidecar::metadata).collect(),
        tuning: (!tuning.is_empty()).then_some(tuning),
        mix: args.ty.mix,
        imatrix: args.imatrix.clone(),
        imatrix_out: args.imatrix_out.clone(),
        ..ConvertOptions::new(args.ty.ty)
    };
    let summary = convert(&args.hf_dir, &args.out, &opts, &progress)
        .with_context(|| format!("converting {}", args.hf_dir.display()))?;
    bar.finish_and_clear();
    if let Some(t) = &summary.tuned {
        if let Some(stats) = &t.stats {
            print!("{}", moe_convert::calib::report(stats));
            if let Some(path) = &args.calib_json {
                let json = moe_convert::calib::to_json(stats, &t.kept);
                std::fs::write(path, json.to_string())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        if let Some(a) = &t.allocation {
            print!("{}", a.report());
        }
        if let Some(im) = &t.imatrix {
            let k_quants = args.ty.mix.is_some() || args.target_size.is_some();
            let used = match (&args.imatrix, k_quants) {
                (Some(file), true) => format!("not used: {} wins", file.display()),
                (None, true) => "weighting the encoders".to_string(),
                (_, false) => "not used: the type is not a mix".to_string(),
            };
            let written = match &args.imatrix_out {
                Some(p) => format!(", written to {}", p.display()),
                None => String::new(),
            };
            println!(
                "importance matrix: {} tensors over {} windows of {} tokens ({used}){written}",
                im.entries.len(),
                im.chunk_count,
                im.chunk_size
            );
        }
        if args.prune_experts.is_some() {
            let n = t.kept.iter().map(Vec::len).max().unwrap_or(0);
            println!("kept {n} experts per MoE layer:");
            for (l, k) in t.kept.iter().enumerate().filter(|(_, k)| !k.is_empty()) {
                println!("  layer {l}: {k:?}");
            }
        }
    }
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
    if !summary.dropped.is_empty() {
        let parts: Vec<String> = summary
            .dropped
            .iter()
            .map(|(part, n)| format!("{part} ({n} tensors)"))
            .collect();
        println!(
            "converted the language model of a multimodal checkpoint; not converted: {}",
            parts.join(", ")
        );
    }
    if let Some(p) = &pregate {
        let at = p.install()?;
        println!("pre-gating router: {}", at.display());
    }
    Ok(())
}
