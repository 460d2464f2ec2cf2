//! moe-convert: Hugging Face MoE checkpoint folder -> one page-aligned GGUF file that llama.cpp
//! can also load.
//!
//! Modules from the bottom up (each uses only those before it): [`error`]; [`hf`] (reading the
//! checkpoint); [`source`] (where an output tensor's values come from); [`arch`] (one file per
//! architecture: how its tensors and config map onto llama.cpp's names and keys), [`router`]
//! (a Read-ME decoupled router beside any backbone), [`sentencepiece`] and [`tokenizer`]; [`plan`] (every output
//! tensor and the metadata, architecture-independent); [`output`] (writing the file);
//! [`calib`] and [`tune`] (calibration, pruning, per-expert types); [`pregate`] (the pre-gating
//! network beside the file); and here [`convert`], the one entry point.

pub mod arch;
pub mod budget;
pub mod calib;
pub mod error;
pub mod hf;
pub mod imatrix;
pub mod mix;
pub mod output;
pub mod pending;
pub mod plan;
pub mod pregate;
pub mod rewrite;
pub mod router;
pub mod sentencepiece;
pub mod source;
pub mod tokenizer;
pub mod tune;

use std::path::{Path, PathBuf};
use std::time::Instant;

use moe_runtime::gguf::{GgmlType, Value};

pub use calib::CalibOptions;
pub use error::ConvertError;
pub use mix::Mix;
pub use output::{Progress, Summary, Tuned};
pub use pregate::PregateSidecar;
pub use tune::{ExpertTypes, PruneSpec};

/// What a conversion produces: the weight type, metadata to add, and optional tuning.
/// `ConvertOptions::new(ty)` is a plain conversion; set the other fields to add to it.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The weight type; norms, biases and routers stay f32 (`plan::choose_type`).
    pub ty: GgmlType,
    /// llama.cpp's per-tensor types for a named mix (`q4_k_m` ...) instead of `ty` everywhere.
    pub mix: Option<Mix>,
    /// llama.cpp's importance matrix (`llama-imatrix -o FILE.gguf`) for a mix's encoders. With
    /// calibration it wins over the one calibration collects.
    pub imatrix: Option<PathBuf>,
    /// Where to write the importance matrix calibration collects, in llama-imatrix's format.
    pub imatrix_out: Option<PathBuf>,
    /// Metadata added to the file (e.g. [`PregateSidecar::metadata`]).
    pub extra_metadata: Vec<(String, Value)>,
    /// Calibration, pruning and per-expert types; `None` converts directly.
    pub tuning: Option<Tuning>,
}

impl ConvertOptions {
    pub fn new(ty: GgmlType) -> Self {
        Self {
            ty,
            mix: None,
            imatrix: None,
            imatrix_out: None,
            extra_metadata: Vec::new(),
            tuning: None,
        }
    }
}

impl Default for ConvertOptions {
    /// q8_0, moe-convert's default type.
    fn default() -> Self {
        Self::new(GgmlType::Q8_0)
    }
}

/// Calibration, pruning and per-expert precision on top of a plain conversion.
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    pub calib: Option<CalibOptions>,
    pub prune: Option<PruneSpec>,
    pub expert_types: Option<ExpertTypes>,
    /// `--target-size`: choose each routed expert matrix's type within a byte budget.
    pub target: Option<(budget::Target, budget::Granularity)>,
    /// With `target`: no expert matrix above this type's bits per weight.
    pub max_expert_type: Option<GgmlType>,
}

impl Tuning {
    pub fn is_empty(&self) -> bool {
        self.calib.is_none()
            && self.prune.is_none()
            && self.expert_types.is_none()
            && self.target.is_none()
    }
}

/// Converts the checkpoint in `src_dir` to `out`. The file appears only when complete (see
/// [`output`]).
///
/// With `opts.tuning`, the model is converted to f32 first (a temporary file next to `out`),
/// calibrated on that file, so statistics describe the unquantized model, and then pruned and
/// given per-expert types as asked; [`Summary::tuned`] tells what was found and kept.
pub fn convert(
    src_dir: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: Progress,
) -> Result<Summary, ConvertError> {
    pending::remove_stale(out);
    match &opts.tuning {
        None if opts.imatrix_out.is_some() => Err(ConvertError::Input(
            "an importance matrix is collected by running the model over calibration text: \
             add --calib TEXT"
                .into(),
        )),
        None => convert_plain(src_dir, out, opts, progress),
        Some(tuning) => convert_tuned(src_dir, out, opts, tuning, progress),
    }
}

fn convert_plain(
    src_dir: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: Progress,
) -> Result<Summary, ConvertError> {
    let t0 = Instant::now();
    let extra = &opts.extra_metadata;
    let ckpt = hf::Checkpoint::open(src_dir)?;
    let conv = arch::for_config(&ckpt.config)?;
    let imatrix = match &opts.imatrix {
        Some(path) if opts.mix.is_some() => Some(imatrix::Imatrix::load(path)?),
        Some(_) => {
            return Err(ConvertError::Input(
                "an importance matrix applies to the k-quant and IQ4 types (q4_k_m ...), not \
                 to f32, f16, bf16, q8_0 or q4_0"
                    .into(),
            ))
        }
        None => None,
    };
    let mut plan = plan::build(&ckpt, conv.as_ref(), opts.ty, opts.mix, imatrix.is_some())?;
    let n_vocab = ckpt.config.usize("vocab_size")?;
    plan.metadata
        .extend(tokenizer::metadata(&ckpt, n_vocab, conv.as_ref())?);
    plan.metadata.extend(extra.iter().cloned());

    let decls: Vec<_> = plan.tensors.iter().map(|t| t.decl.clone()).collect();
    for d in &decls {
        if d.name.len() >= 64 {
            return Err(ConvertError::Input(format!(
                "tensor name `{}` is too long for GGUF (63 bytes at most)",
                d.name
            )));
        }
    }
    let values = |i: usize| source::load(&ckpt, &plan.tensors[i].source);
    let mut summary = output::write_gguf(
        out,
        plan.arch_name,
        &plan.metadata,
        decls,
        values,
        imatrix.as_ref(),
        progress,
    )?;
    // The mapping accepts what each architecture's tensors need one by one; a checkpoint that
    // is inconsistent as a whole (a q norm without its k norm, say) would make a file the
    // runtime refuses. Load it as the runtime will, and leave no such file behind.
    if let Err(why) = runtime_loads(out) {
        let _ = std::fs::remove_file(out);
        return Err(ConvertError::Input(format!(
            "the checkpoint converts to a model the runtime cannot load ({why}); is the \
             folder complete and its config.json right?"
        )));
    }
    summary.elapsed = t0.elapsed();
    summary.dropped = ckpt.dropped.clone();
    Ok(summary)
}

/// The error of a calibration text too short for one whole window.
fn no_window(tuning: &Tuning) -> ConvertError {
    let window = tuning.calib.as_ref().map_or(0, |c| c.window);
    ConvertError::Input(format!(
        "the calibration text fills no whole window of {window} tokens, which an importance \
         matrix is summed over (as llama-imatrix's chunks): give a longer text or a smaller \
         --calib-window"
    ))
}

/// Whether the runtime loads the model file at `path` (its header, hyper-parameters and every
/// tensor it looks up); why not, if it does not.
fn runtime_loads(path: &Path) -> Result<(), String> {
    let file = moe_runtime::gguf::GgufFile::open(path).map_err(|e| e.to_string())?;
    moe_runtime::model::Model::load(&file).map_err(|e| e.to_string())?;
    Ok(())
}

fn convert_tuned(
    src_dir: &Path,
    out: &Path,
    opts: &ConvertOptions,
    tuning: &Tuning,
    progress: Progress,
) -> Result<Summary, ConvertError> {
    let t0 = Instant::now();
    if opts.mix.is_some() && tuning.expert_types.is_some() {
        return Err(ConvertError::Input(
            "per-expert types take a single --type (f32, f16, bf16, q8_0, q4_0), not a k-quant \
             mix"
            .into(),
        ));
    }
    if tuning.target.is_some() && tuning.expert_types.is_some() {
        return Err(ConvertError::Input(
            "--target-size chooses every expert's type itself; drop --expert-types".into(),
        ));
    }
    // With --target-size the experts are k-quants whatever --type says.
    let k_quants = opts.mix.is_some() || tuning.target.is_some();
    if opts.imatrix.is_some() && !k_quants {
        return Err(ConvertError::Input(
            "an importance matrix applies to the k-quant and IQ4 types (q4_k_m ...) and to \
             --target-size, not to f32, f16, bf16, q8_0 or q4_0"
                .into(),
        ));
    }
    if opts.imatrix_out.is_some() && tuning.calib.is_none() {
        return Err(ConvertError::Input(
            "an importance matrix is collected by running the model over calibration text: \
             add --calib TEXT"
                .into(),
        ));
    }
    // A file given with --imatrix is read before the long part, so that a bad one fails early.
    let given = opts
        .imatrix
        .as_deref()
        .map(imatrix::Imatrix::load)
        .transpose()?;
    let f32_path = pending::temp_path(&out.with_extension("f32.gguf"));
    let result = (|| {
        let f32_opts = ConvertOptions::new(GgmlType::F32);
        let dropped = convert_plain(src_dir, &f32_path, &f32_opts, progress)?.dropped;
        let (stats, collected) = match &tuning.calib {
            Some(c) => {
                let cal = calib::calibrate(&f32_path, c)?;
                (Some(cal.stats), cal.imatrix)
            }
            None => (None, None),
        };
        if let Some(path) = &opts.imatrix_out {
            let c = collected.as_ref().ok_or_else(|| no_window(tuning))?;
            c.write(path)?;
        }
        let (moe_layers, n_expert, shape) = {
            let file = moe_runtime::gguf::GgufFile::open(&f32_path)?;
            let model = moe_runtime::model::Model::load(&file)
                .map_err(|e| ConvertError::Input(format!("the converted model: {e}")))?;
            let moe: Vec<bool> = model
                .layers
                .iter()
                .map(|l| matches!(l.ffn, moe_runtime::model::Ffn::Moe(_)))
                .collect();
            let hp = &model.hp;
            // What llama-quantize's rules read of the model (`n_gqa()` is layer 0's).
            // A recurrent layer 0 has no KV heads: 0, as llama.cpp's n_gqa() then.
            let n_head_kv = hp.layer_dims(0).n_head_kv;
            let shape = mix::ModelShape {
                n_layer: hp.n_layer,
                n_expert: hp.n_expert,
                n_gqa: hp.n_head.checked_div(n_head_kv).unwrap_or(0),
                tied_output: file.header().tensor("output.weight").is_none(),
            };
            (moe, hp.n_expert, shape)
        };
        let kept = match &tuning.prune {
            Some(p) => p.kept(&moe_layers, n_expert, stats.as_ref())?,
            None => moe_layers
                .iter()
                .map(|&m| {
                    if m {
                        (0..n_expert).collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect(),
        };
        let pruned = tuning.prune.is_some();
        let mut extra = opts.extra_metadata.clone();
        if let Some(s) = &stats {
            extra.extend(s.select(&kept).to_metadata());
        }
        let n_kept = kept.iter().map(Vec::len).max().unwrap_or(0);
        if pruned {
            let mut ids = vec![0u32; kept.len() * n_kept];
            for (l, ks) in kept.iter().enumerate() {
                for (i, &e) in ks.iter().enumerate() {
                    ids[l * n_kept + i] = e as u32;
                }
            }
            extra.push((
                moe_runtime::moe::calib::KEY_EXPERT_IDS.into(),
                Value::u32_array(ids),
            ));
        }
        let hot = match &tuning.expert_types {
            Some(t) => {
                let s = stats.as_ref().ok_or_else(|| {
                    ConvertError::Input(
                        "--expert-types picks hot experts from calibration statistics: add --calib TEXT"
                            .into(),
                    )
                })?;
                Some(t.hot_sets(&kept, s))
            }
            None => None,
        };
        // The encoders' weights: the file given with --imatrix wins over the collected ones
        // (llama-imatrix may have run over more text than --calib-tokens); the rewrite cuts
        // them to the kept experts.
        let weights = match (k_quants, given, &collected) {
            (false, ..) => None,
            (true, Some(w), _) => Some(w),
            (true, None, Some(c)) => Some(c.weights()),
            (true, None, None) if tuning.calib.is_some() => return Err(no_window(tuning)),
            (true, None, None) => None,
        };
        let experts = match (&tuning.expert_types, hot.as_deref()) {
            (Some(t), Some(hot)) => rewrite::ExpertPlan::hot_cold(t, hot),
            _ => rewrite::ExpertPlan::Uniform,
        };
        let mut rw = rewrite::Rewrite {
            ty: opts.ty,
            kept: &kept,
            experts,
            mix: opts.mix.map(|m| {
                (
                    m,
                    mix::ModelShape {
                        n_expert: n_kept,
                        ..shape
                    },
                )
            }),
            imatrix: weights.as_ref(),
            extra_metadata: extra,
        };
        let mut allocation = None;
        if let Some((target, granularity)) = tuning.target {
            let s = stats.as_ref().ok_or_else(|| {
                ConvertError::Input(
                    "--target-size weighs experts by calibration statistics: add --calib TEXT"
                        .into(),
                )
            })?;
            let file = moe_runtime::gguf::GgufFile::open(&f32_path)?;
            // The directory of the layout the allocation writes, with placeholder types.
            rw.experts = match granularity {
                budget::Granularity::PerExpert => rewrite::ExpertPlan::PerExpert {
                    types: kept
                        .iter()
                        .map(|k| vec![[GgmlType::Q8_0; 3]; k.len()])
                        .collect(),
                    hot: None,
                },
                budget::Granularity::Stacked => rewrite::ExpertPlan::Uniform,
            };
            let fixed_bytes = rewrite::fixed_bytes(&file, &rw)?;
            let params = rewrite::output_params(&file, &kept);
            let a = budget::allocate(
                &budget::Inputs {
                    file: &file,
                    kept: &kept,
                    stats: s,
                    imatrix: weights.as_ref(),
                    fixed_bytes,
                    params,
                    max_type: tuning.max_expert_type,
                },
                target,
                granularity,
            )?;
            rw.experts = rewrite::ExpertPlan::allocated(&a);
            allocation = Some(a);
        }
        let mut summary = rewrite::rewrite(&f32_path, out, &rw)?;
        summary.elapsed = t0.elapsed();
        summary.tuned = Some(Tuned {
            stats,
            kept,
            allocation,
            imatrix: collected,
        });
        summary.dropped = dropped;
        Ok(summary)
    })();
    let _ = std::fs::remove_file(&f32_path);
    result
}
