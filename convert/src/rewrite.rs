//! The final file of a tuned conversion, rewritten from moe-convert's intermediate f32 file: kept
//! experts only (pruning), the routed experts stacked or one tensor per expert, each tensor at the
//! type the plan gives it (a single type, llama.cpp's mix, `--expert-types`, or a
//! `--target-size` allocation), the encoders weighted by the importance matrix.

use std::path::Path;

use moe_runtime::gguf::{align_up, GgmlType, GgufFile, TensorDecl, Value, PAGE_ALIGNMENT};
use moe_runtime::moe::calib;

use crate::error::ConvertError;
use crate::imatrix::Imatrix;
use crate::mix::{Mix, ModelShape};
use crate::output::{write_gguf, Summary};
use crate::plan::{choose_type, file_type};
use crate::tune::ExpertTypes;

/// What the final file contains beyond a plain conversion.
pub struct Rewrite<'a> {
    pub ty: GgmlType,
    /// Per layer, the original indices of the kept experts (all, when not pruning).
    pub kept: &'a [Vec<usize>],
    /// The routed experts' types.
    pub experts: ExpertPlan<'a>,
    /// llama.cpp's per-tensor types of a named mix instead of `ty`, with the shape of the
    /// written (pruned) model its rules look at: for every tensor with
    /// [`ExpertPlan::Uniform`], for the non-expert ones otherwise.
    pub mix: Option<(Mix, ModelShape)>,
    /// Importance weights for the encoders, by the source file's tensor names (cut to the
    /// written experts by the rewrite).
    pub imatrix: Option<&'a Imatrix>,
    pub extra_metadata: Vec<(String, Value)>,
}

/// How the routed experts are stored.
pub enum ExpertPlan<'a> {
    /// Stacked tensors (llama.cpp's layout) at the rewrite's type.
    Uniform,
    /// Stacked tensors, each its own type: `[layer][matrix]` for `budget::MATRICES` (ignored
    /// for layers without routed experts).
    Stacked(Vec<[GgmlType; 3]>),
    /// moe-edge's per-expert layout: `types[layer][kept expert][matrix]`, and when given which
    /// experts are hot (stored as `moe_edge.hot_experts`).
    PerExpert {
        types: Vec<Vec<[GgmlType; 3]>>,
        hot: Option<&'a [Vec<bool>]>,
    },
}

impl<'a> ExpertPlan<'a> {
    /// `--expert-types`: the hot experts at one type, the others at another.
    pub fn hot_cold(types: &ExpertTypes, hot: &'a [Vec<bool>]) -> Self {
        let types = hot
            .iter()
            .map(|hs| {
                hs.iter()
                    .map(|&h| [if h { types.hot_ty } else { types.cold_ty }; 3])
                    .collect()
            })
            .collect();
        Self::PerExpert {
            types,
            hot: Some(hot),
        }
    }

    /// The types an allocation chose, in its granularity's layout.
    pub fn allocated(a: &crate::budget::Allocation) -> Self {
        match a.granularity {
            crate::budget::Granularity::PerExpert => Self::PerExpert {
                types: a.types.clone(),
                hot: None,
            },
            crate::budget::Granularity::Stacked => Self::Stacked(
                a.types
                    .iter()
                    .map(|l| l.first().copied().unwrap_or([GgmlType::F32; 3]))
                    .collect(),
            ),
        }
    }
}

/// Which tensors carry one entry per expert along their last dimension.
enum ExpertTensor {
    /// The router (`[d, n_expert]`) or a per-expert bias (`[n_expert]`).
    Rows(usize),
    /// A stacked expert tensor `[c, r, n_expert]`, with its name stem for the per-expert layout.
    Stacked(usize, String),
}

fn classify(name: &str) -> Option<ExpertTensor> {
    let rest = name.strip_prefix("blk.")?;
    let (l, tail) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    if tail == "ffn_gate_inp.weight" || tail.starts_with("exp_probs_b") {
        return Some(ExpertTensor::Rows(l));
    }
    for w in [
        "ffn_gate_exps.weight",
        "ffn_up_exps.weight",
        "ffn_down_exps.weight",
    ] {
        if tail == w {
            return Some(ExpertTensor::Stacked(
                l,
                name.strip_suffix(".weight").unwrap_or(name).to_string(),
            ));
        }
    }
    None
}

/// One tensor of the rewritten file: its declaration, the source tensor and what to take from it.
struct Out {
    decl: TensorDecl,
    src: usize,
    part: Part,
}

enum Part {
    All,
    Rows(Vec<usize>),
    Slab(usize),
}

/// Writes `out` from the f32 file `src`.
pub fn rewrite(src: &Path, out: &Path, rw: &Rewrite) -> Result<Summary, ConvertError> {
    let file = GgufFile::open(src)?;
    let h = file.header();
    let Planned { arch, meta, outs } = plan(&file, rw)?;
    let decls: Vec<TensorDecl> = outs.iter().map(|o| o.decl.clone()).collect();
    let values = |i: usize| {
        let o = &outs[i];
        let info = &h.tensors()[o.src];
        // Packed experts (MXFP4) come back as their values; the rewrite encodes them in the
        // type it chose.
        let all = f32s(info.ty, file.tensor_bytes(info));
        let per: usize = info.dims[..info.dims.len() - 1].iter().product();
        Ok(crate::source::TensorData::Values(match &o.part {
            Part::All => all,
            Part::Rows(ids) => ids
                .iter()
                .flat_map(|&e| all[e * per..(e + 1) * per].iter().copied())
                .collect(),
            Part::Slab(e) => all[e * per..(e + 1) * per].to_vec(),
        }))
    };
    let imatrix = rw.imatrix.map(|im| for_outputs(im, h, &outs));
    write_gguf(
        out,
        &arch,
        &meta,
        decls,
        values,
        imatrix.as_ref(),
        &|_, _, _| {},
    )
}

/// The importance weights of the source tensors, renamed and cut as the rewrite writes them:
/// a pruned stacked tensor keeps its kept experts' rows, an expert of the per-expert layout its
/// own row.
fn for_outputs(im: &Imatrix, h: &moe_runtime::gguf::GgufHeader, outs: &[Out]) -> Imatrix {
    let mut entries = std::collections::HashMap::new();
    for o in outs {
        let info = &h.tensors()[o.src];
        let Some(w) = im.entries.get(&info.name) else {
            continue;
        };
        // Only stacked experts have one row of weights per expert; a router's rows are its
        // outputs, and its weights (per input column) stay whole when experts are pruned.
        let n_slices = info.dims.get(2).copied().unwrap_or(1);
        if w.len() % n_slices != 0 {
            continue;
        }
        let row = w.len() / n_slices;
        let cut = match &o.part {
            _ if n_slices == 1 => w.clone(),
            Part::All => w.clone(),
            Part::Rows(ids) => ids
                .iter()
                .flat_map(|&e| w[e * row..(e + 1) * row].iter().copied())
                .collect(),
            Part::Slab(e) => w[e * row..(e + 1) * row].to_vec(),
        };
        entries.insert(o.decl.name.clone(), cut);
    }
    Imatrix { entries }
}

/// The number of weights the rewritten file holds (pruned experts left out).
pub fn output_params(file: &GgufFile, kept: &[Vec<usize>]) -> u64 {
    file.header()
        .tensors()
        .iter()
        .map(|t| {
            let n = t.n_elements() as u64;
            match classify(&t.name) {
                Some(ExpertTensor::Rows(l) | ExpertTensor::Stacked(l, _)) => {
                    let all = *t.dims.last().expect("dims") as u64;
                    n / all.max(1) * kept[l].len() as u64
                }
                None => n,
            }
        })
        .sum()
}

/// The bytes `rewrite` would write for everything but the routed experts: the header (with the
/// routed experts' directory entries) and every other tensor, page-aligned as written.
pub fn fixed_bytes(file: &GgufFile, rw: &Rewrite) -> Result<u64, ConvertError> {
    let Planned { meta, outs, .. } = plan(file, rw)?;
    let decls: Vec<TensorDecl> = outs.iter().map(|o| o.decl.clone()).collect();
    let header = moe_runtime::gguf::GgufWriter::begin(Vec::new(), &meta, decls, PAGE_ALIGNMENT)?
        .get_ref()
        .len() as u64;
    let align = |b: usize| align_up(b as u64, PAGE_ALIGNMENT as u64).expect("size fits");
    let mut bytes = header;
    for o in &outs {
        if classify(&file.header().tensors()[o.src].name)
            .is_some_and(|c| matches!(c, ExpertTensor::Stacked(..)))
        {
            continue;
        }
        bytes += align(o.decl.byte_size()?);
    }
    Ok(bytes)
}

/// The metadata and tensors of the rewritten file.
struct Planned {
    arch: String,
    meta: Vec<(String, Value)>,
    outs: Vec<Out>,
}

fn plan(file: &GgufFile, rw: &Rewrite) -> Result<Planned, ConvertError> {
    let h = file.header();
    let arch = h
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let n_kept = rw.kept.iter().map(Vec::len).max().unwrap_or(0);
    let used_key = format!("{arch}.expert_used_count");
    let n_used = h.get(&used_key).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let tied = h.tensor("output.weight").is_none();
    // Group-limited routing (DeepSeek) picks whole groups of consecutive experts: a pruned layer
    // must keep the same number in every group, or the groups would change meaning.
    let n_expert = h
        .get(&format!("{arch}.expert_count"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    let n_group = h
        .get(&format!("{arch}.expert_group_count"))
        .and_then(|v| v.as_u64())
        .unwrap_or(1) as usize;
    if n_group > 1 && n_kept < n_expert {
        let per = n_expert / n_group.max(1);
        for (l, kept) in rw.kept.iter().enumerate() {
            let mut counts = vec![0usize; n_group];
            for &e in kept {
                counts[(e / per).min(n_group - 1)] += 1;
            }
            if counts.iter().any(|&c| c != counts[0]) {
                return Err(ConvertError::Input(format!(
                    "layer {l} would keep {counts:?} experts in its {n_group} expert groups; \
                     this model routes by groups, so pruning must keep the same number of \
                     experts in every group (drop the same count from each group with drop:L:E,...)"
                )));
            }
        }
    }
    let mut meta: Vec<(String, Value)> = Vec::new();
    for (k, v) in h.metadata() {
        let v = if k == "general.alignment" {
            continue;
        } else if *k == format!("{arch}.expert_count") {
            Value::U32(n_kept as u32)
        } else if *k == used_key {
            Value::U32(n_used.min(n_kept) as u32)
        } else if k == "general.file_type" {
            Value::U32(
                rw.mix
                    .map_or_else(|| file_type(rw.ty), |(m, _)| m.file_type()),
            )
        } else {
            v.clone()
        };
        meta.push((k.clone(), v));
    }
    meta.extend(rw.extra_metadata.iter().cloned());
    if let ExpertPlan::PerExpert { hot, .. } = &rw.experts {
        meta.push((
            calib::KEY_LAYOUT.into(),
            Value::String(calib::LAYOUT_PER_EXPERT.into()),
        ));
        if let Some(hot) = hot {
            let mut flags = vec![0u32; rw.kept.len() * n_kept];
            for (l, hs) in hot.iter().enumerate() {
                for (i, &x) in hs.iter().enumerate() {
                    flags[l * n_kept + i] = x as u32;
                }
            }
            meta.push((calib::KEY_HOT.into(), Value::u32_array(flags)));
        }
    }

    // Plan every output tensor: (declaration, source tensor, what to take from it).
    let mut outs = Vec::new();
    for (si, t) in h.tensors().iter().enumerate() {
        if t.ty != GgmlType::F32 {
            return Err(ConvertError::Input(format!(
                "internal: tensor `{}` of the intermediate file is {}, expected f32",
                t.name, t.ty
            )));
        }
        match classify(&t.name) {
            Some(ExpertTensor::Rows(l)) => {
                let mut dims = t.dims.clone();
                *dims.last_mut().expect("dims") = n_kept;
                outs.push(Out {
                    decl: TensorDecl {
                        name: t.name.clone(),
                        dims,
                        ty: GgmlType::F32,
                    },
                    src: si,
                    part: Part::Rows(rw.kept[l].clone()),
                });
            }
            Some(ExpertTensor::Stacked(l, stem)) => {
                let matrix = crate::budget::MATRICES
                    .iter()
                    .position(|m| stem.ends_with(m))
                    .expect("classify names the three matrices");
                match &rw.experts {
                    ExpertPlan::Uniform | ExpertPlan::Stacked(_) => {
                        let want = match &rw.experts {
                            ExpertPlan::Stacked(types) => types[l][matrix],
                            _ => rw.ty,
                        };
                        let dims = vec![t.dims[0], t.dims[1], n_kept];
                        let ty = choose_type(&t.name, &dims, want, tied);
                        outs.push(Out {
                            decl: TensorDecl {
                                name: t.name.clone(),
                                dims,
                                ty,
                            },
                            src: si,
                            part: Part::Rows(rw.kept[l].clone()),
                        });
                    }
                    // One expert's gate, up and down are written next to each other (when the
                    // gate tensor comes by), so the expert cache reads an expert with one request.
                    ExpertPlan::PerExpert { .. } if matrix != 0 => {}
                    ExpertPlan::PerExpert { types, .. } => {
                        let prefix = stem.strip_suffix("ffn_gate_exps").unwrap_or(&stem);
                        let mut parts = Vec::new();
                        for which in crate::budget::MATRICES {
                            let name = format!("{prefix}{which}.weight");
                            let src = h.tensors().iter().position(|x| x.name == name).ok_or_else(
                                || ConvertError::Input(format!("internal: `{name}` is missing")),
                            )?;
                            parts.push((format!("{prefix}{which}"), src));
                        }
                        for (i, &e) in rw.kept[l].iter().enumerate() {
                            for (m, (pstem, src)) in parts.iter().enumerate() {
                                let sinfo = &h.tensors()[*src];
                                let name = calib::per_expert_name(pstem, i);
                                let dims = vec![sinfo.dims[0], sinfo.dims[1]];
                                let ty = choose_type(&name, &dims, types[l][i][m], tied);
                                outs.push(Out {
                                    decl: TensorDecl { name, dims, ty },
                                    src: *src,
                                    part: Part::Slab(e),
                                });
                            }
                        }
                    }
                }
            }
            None => {
                let ty = choose_type(&t.name, &t.dims, rw.ty, tied);
                outs.push(Out {
                    decl: TensorDecl {
                        name: t.name.clone(),
                        dims: t.dims.clone(),
                        ty,
                    },
                    src: si,
                    part: Part::All,
                });
            }
        }
    }

    if let Some((mix, shape)) = rw.mix {
        apply_mix(h, rw, mix, shape, tied, &mut outs);
    }
    Ok(Planned { arch, meta, outs })
}

/// Retypes the planned tensors as llama-quantize's `mix` would an f16 file of them
/// (`plan::apply_mix`), except the routed experts when the plan gives them their own types.
fn apply_mix(
    h: &moe_runtime::gguf::GgufHeader,
    rw: &Rewrite,
    mix: Mix,
    shape: ModelShape,
    tied: bool,
    outs: &mut [Out],
) {
    let named: Vec<(&str, &[usize])> = outs
        .iter()
        .map(|o| (o.decl.name.as_str(), o.decl.dims.as_slice()))
        .collect();
    let types = mix.tensor_types(&named, shape, rw.imatrix.is_some(), |i| {
        choose_type(named[i].0, named[i].1, GgmlType::F16, tied)
    });
    let experts_own_types = !matches!(rw.experts, ExpertPlan::Uniform);
    for (o, ty) in outs.iter_mut().zip(types) {
        let expert = matches!(
            classify(&h.tensors()[o.src].name),
            Some(ExpertTensor::Stacked(..))
        );
        if !(expert && experts_own_types) {
            o.decl.ty = ty;
        }
    }
}

fn f32s(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    if ty == GgmlType::F32 {
        return bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
    }
    let mut out = vec![0f32; bytes.len() / ty.block_bytes() * ty.block_len()];
    moe_runtime::tensor::quant::dequantize(ty, bytes, &mut out);
    out
}
