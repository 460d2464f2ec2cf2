//! moe-convert: Hugging Face MoE checkpoint folder -> one page-aligned GGUF file that llama.cpp
//! can also load.

pub mod arch;
pub mod calib;
mod error;
pub mod hf;
pub mod plan;
pub mod router;
pub mod source;
pub mod tokenizer;
pub mod tune;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moe_runtime::gguf::{GgmlType, GgufWriter, Value, PAGE_ALIGNMENT};
use rayon::prelude::*;

pub use calib::CalibOptions;
pub use error::ConvertError;
pub use plan::Options;
pub use tune::{ExpertTypes, PruneSpec};

/// What a conversion wrote.
#[derive(Debug, Default)]
pub struct Summary {
    pub arch: String,
    pub n_tensors: usize,
    /// Bytes of tensor data per type.
    pub bytes_by_type: BTreeMap<String, u64>,
    pub file_bytes: u64,
    pub elapsed: Duration,
}

/// Called after each tensor with (bytes done, bytes total, tensor name).
pub type Progress<'a> = &'a (dyn Fn(u64, u64, &str) + Sync);

/// Converts the checkpoint in `src_dir` to `out`. The file appears only when complete: data goes
/// to a temporary file in the same folder, renamed at the end and removed on failure.
pub fn convert(
    src_dir: &Path,
    out: &Path,
    opts: Options,
    progress: Progress,
) -> Result<Summary, ConvertError> {
    convert_with_metadata(src_dir, out, opts, &[], progress)
}

/// [`convert`], adding `extra` metadata (e.g. [`PregateSidecar::metadata`]).
pub fn convert_with_metadata(
    src_dir: &Path,
    out: &Path,
    opts: Options,
    extra: &[(String, Value)],
    progress: Progress,
) -> Result<Summary, ConvertError> {
    let t0 = Instant::now();
    let ckpt = hf::Checkpoint::open(src_dir)?;
    let conv = arch::for_config(&ckpt.config)?;
    let mut plan = plan::build(&ckpt, conv.as_ref(), opts)?;
    let n_vocab = ckpt.config.usize("vocab_size")?;
    plan.metadata.extend(tokenizer::metadata(&ckpt, n_vocab)?);
    plan.metadata.extend(extra.iter().cloned());

    let decls: Vec<_> = plan.tensors.iter().map(|t| t.decl.clone()).collect();
    let total: u64 = decls
        .iter()
        .map(|d| d.byte_size().map(|s| s as u64))
        .sum::<Result<u64, _>>()?;
    for d in &decls {
        if d.name.len() >= 64 {
            return Err(ConvertError::Input(format!(
                "tensor name `{}` is too long for GGUF (63 bytes at most)",
                d.name
            )));
        }
    }

    let tmp = temp_path(out);
    let result = (|| -> Result<Summary, ConvertError> {
        let file = File::create(&tmp).map_err(|e| ConvertError::io(&tmp, e))?;
        let mut writer = GgufWriter::begin(
            BufWriter::with_capacity(1 << 20, file),
            &plan.metadata,
            decls,
            PAGE_ALIGNMENT,
        )?;
        let mut summary = Summary {
            arch: plan.arch_name.to_string(),
            n_tensors: plan.tensors.len(),
            ..Default::default()
        };
        let mut done = 0u64;
        for t in &plan.tensors {
            let values = source::load_values(&ckpt, &t.source)?;
            let expected: usize = t.decl.dims.iter().product();
            if values.len() != expected {
                return Err(ConvertError::Shape {
                    name: t.decl.name.clone(),
                    expected: t.decl.dims.clone(),
                    found: vec![values.len()],
                });
            }
            let bytes = quantize_rows(t.decl.ty, &values, t.decl.dims[0]);
            writer.write_tensor_data(&bytes)?;
            done += bytes.len() as u64;
            *summary
                .bytes_by_type
                .entry(t.decl.ty.name().to_string())
                .or_default() += bytes.len() as u64;
            progress(done, total, &t.decl.name);
        }
        let buf = writer.finish()?;
        let file = buf
            .into_inner()
            .map_err(|e| ConvertError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| ConvertError::io(&tmp, e))?;
        summary.file_bytes = file
            .metadata()
            .map_err(|e| ConvertError::io(&tmp, e))?
            .len();
        Ok(summary)
    })();
    match result {
        Ok(mut summary) => {
            std::fs::rename(&tmp, out).map_err(|e| ConvertError::io(out, e))?;
            summary.elapsed = t0.elapsed();
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Calibration, pruning and per-expert precision on top of a plain conversion.
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    pub calib: Option<CalibOptions>,
    pub prune: Option<PruneSpec>,
    pub expert_types: Option<ExpertTypes>,
}

impl Tuning {
    pub fn is_empty(&self) -> bool {
        self.calib.is_none() && self.prune.is_none() && self.expert_types.is_none()
    }
}

/// What a tuned conversion did.
pub struct TunedSummary {
    pub summary: Summary,
    /// Statistics of the unpruned model, when calibrated.
    pub stats: Option<moe_runtime::moe::calib::CalibStats>,
    /// Per layer, the original indices of the kept experts.
    pub kept: Vec<Vec<usize>>,
}

/// Converts like [`convert`], then calibrates, prunes and assigns per-expert types as `tuning`
/// asks. The model is converted to f32 first (a temporary file next to `out`); calibration runs
/// on it, so statistics describe the unquantized model.
pub fn convert_tuned(
    src_dir: &Path,
    out: &Path,
    opts: Options,
    tuning: &Tuning,
    progress: Progress,
) -> Result<TunedSummary, ConvertError> {
    convert_tuned_with_metadata(src_dir, out, opts, tuning, &[], progress)
}

/// [`convert_tuned`], adding `extra` metadata.
pub fn convert_tuned_with_metadata(
    src_dir: &Path,
    out: &Path,
    opts: Options,
    tuning: &Tuning,
    extra_metadata: &[(String, Value)],
    progress: Progress,
) -> Result<TunedSummary, ConvertError> {
    let t0 = Instant::now();
    let f32_path = temp_path(&out.with_extension("f32.gguf"));
    let result = (|| {
        convert(src_dir, &f32_path, Options { ty: GgmlType::F32 }, progress)?;
        let stats = match &tuning.calib {
            Some(c) => Some(calib::calibrate(&f32_path, c)?),
            None => None,
        };
        let (moe_layers, n_expert) = {
            let file = moe_runtime::gguf::GgufFile::open(&f32_path)?;
            let model = moe_runtime::model::Model::load(&file)
                .map_err(|e| ConvertError::Input(format!("the converted model: {e}")))?;
            let moe: Vec<bool> = model
                .layers
                .iter()
                .map(|l| matches!(l.ffn, moe_runtime::model::Ffn::Moe(_)))
                .collect();
            (moe, model.hp.n_expert)
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
        let mut extra = extra_metadata.to_vec();
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
                moe_runtime::gguf::Value::u32_array(ids),
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
        let rw = tune::Rewrite {
            ty: opts.ty,
            kept: &kept,
            mixed: tuning.expert_types.as_ref().zip(hot.as_deref()),
            extra_metadata: extra,
        };
        let mut summary = tune::rewrite(&f32_path, out, &rw)?;
        summary.elapsed = t0.elapsed();
        Ok(TunedSummary {
            summary,
            stats,
            kept,
        })
    })();
    let _ = std::fs::remove_file(&f32_path);
    result
}

/// A pre-gating router network (ONNX, from scripts/train_pregate.py) referenced from the GGUF:
/// the key `moe_edge.pregate.onnx` names it relative to the GGUF's folder, where moe-run's
/// `--predictor pregate` looks for it. A file elsewhere is copied beside the output as
/// `<output stem>.pregate.onnx`, so the pair can be moved together.
pub struct PregateSidecar {
    src: PathBuf,
    dst: PathBuf,
    name: String,
}

impl PregateSidecar {
    pub fn new(out: &Path, onnx: &Path) -> Result<Self, ConvertError> {
        let meta = std::fs::metadata(onnx).map_err(|e| ConvertError::io(onnx, e))?;
        if !meta.is_file() || meta.len() == 0 {
            return Err(ConvertError::Input(format!(
                "--pregate {}: not a (non-empty) file; pass the .onnx that scripts/train_pregate.py wrote",
                onnx.display()
            )));
        }
        let out_dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let same_dir = match (onnx.parent(), std::fs::canonicalize(&out_dir)) {
            (Some(p), Ok(o)) => {
                let p = if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                };
                std::fs::canonicalize(p).is_ok_and(|p| p == o)
            }
            _ => false,
        };
        let name = if same_dir {
            onnx.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            format!("{stem}.pregate.onnx")
        };
        Ok(Self {
            src: onnx.to_path_buf(),
            dst: out_dir.join(&name),
            name,
        })
    }

    pub fn metadata(&self) -> (String, Value) {
        (
            moe_runtime::moe::predictor::PREGATE_KEY.into(),
            Value::String(self.name.clone()),
        )
    }

    /// Copies the network beside the output when it is not there yet; returns where it is.
    pub fn install(&self) -> Result<&Path, ConvertError> {
        let same = match (
            std::fs::canonicalize(&self.src),
            std::fs::canonicalize(&self.dst),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same {
            std::fs::copy(&self.src, &self.dst).map_err(|e| ConvertError::io(&self.dst, e))?;
        }
        Ok(&self.dst)
    }
}

pub(crate) fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.gguf".into());
    out.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Encodes rows of `row_len` values in parallel.
pub(crate) fn quantize_rows(ty: GgmlType, values: &[f32], row_len: usize) -> Vec<u8> {
    let row_bytes = ty
        .row_bytes(row_len)
        .expect("plan chose a type that fits the rows");
    let n_rows = values.len() / row_len;
    let mut out = vec![0u8; n_rows * row_bytes];
    out.par_chunks_mut(row_bytes)
        .zip(values.par_chunks(row_len))
        .for_each(|(dst, src)| dst.copy_from_slice(&moe_runtime::tensor::quant::quantize(ty, src)));
    out
}
