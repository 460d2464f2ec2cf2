//! The conversion plan: every output tensor with its GGUF name, shape, type and source, plus the
//! metadata. Built and checked completely before anything is written.

use moe_runtime::gguf::{GgmlType, TensorDecl, Value};

use crate::arch::{ArchConverter, ExpertMlp, ExpertSource, FfnSource, PreparedExperts};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};
use crate::mix::{Mix, ModelShape};
use crate::source::Source;

#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub decl: TensorDecl,
    pub source: Source,
}

pub struct Plan {
    pub arch_name: &'static str,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<PlannedTensor>,
}

/// llama.cpp's `general.file_type` (enum llama_ftype) for the main weight type.
pub(crate) fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q5_0 => 8,
        GgmlType::Q8_0 => 7,
        GgmlType::Q2K => 10,
        GgmlType::Q3K => 12,
        GgmlType::Q4K => 15,
        GgmlType::Q5K => 17,
        GgmlType::Q6K => 18,
        GgmlType::IQ2XXS => 19,
        GgmlType::IQ2XS => 20,
        GgmlType::IQ3XXS => 23,
        GgmlType::IQ1S => 24,
        GgmlType::IQ4NL => 25,
        GgmlType::IQ3S => 26,
        GgmlType::IQ2S => 28,
        GgmlType::IQ4XS => 30,
        GgmlType::IQ1M => 31,
        GgmlType::BF16 => 32,
        GgmlType::MXFP4 => 38,
    }
}

/// The type a tensor gets: norms, biases and routers stay f32 (as llama.cpp's converter keeps
/// them); rows that are not whole blocks fall back to f16; under q4_0 the output projection is
/// kept at q8_0 because logits are the most sensitive (llama.cpp uses q6_K there).
pub(crate) fn choose_type(
    name: &str,
    dims: &[usize],
    requested: GgmlType,
    tied_output: bool,
) -> GgmlType {
    // Short-convolution and DeltaNet conv taps stay f32 as llama.cpp's converter and llama-quantize keep them
    // (ggml's ssm_conv takes f32 only).
    let is_router = name.contains("ffn_gate_inp")
        || name.contains("shortconv.conv")
        || name.contains("ssm_conv1d");
    // A decoupled router is small and decides every layer's experts: kept exact.
    let is_decoupled_router = name.starts_with(crate::router::PREFIX);
    // Norms stay f32 when they are 2-D too (Mamba-2's grouped `ssm_norm`), as llama.cpp's
    // converter keeps every `_norm.weight`.
    let is_norm = name.ends_with("_norm.weight");
    if dims.len() == 1 || is_router || is_norm || is_decoupled_router || !name.ends_with(".weight")
    {
        return GgmlType::F32;
    }
    let mut ty = requested;
    let is_output = name == "output.weight" || (tied_output && name == "token_embd.weight");
    if requested == GgmlType::Q4_0 && is_output {
        ty = GgmlType::Q8_0;
    }
    if ty.row_bytes(dims[0]).is_none() {
        ty = GgmlType::F16;
    }
    ty
}

/// Plans the conversion of `ckpt` as the architecture `conv` describes, with weights of type
/// `ty` where they fit, or of the types llama.cpp's `mix` gives them.
pub fn build(
    ckpt: &Checkpoint,
    conv: &dyn ArchConverter,
    ty: GgmlType,
    mix: Option<Mix>,
    has_imatrix: bool,
) -> Result<Plan, ConvertError> {
    let cfg = &ckpt.config;
    let arch = conv.arch();
    let arch_name = arch.gguf_name();
    let d = cfg.usize("hidden_size")?;
    let n_layer = cfg.usize("num_hidden_layers")?;
    let n_head = cfg.usize("num_attention_heads")?;
    if n_head == 0 {
        return Err(ConvertError::Config {
            field: "num_attention_heads".into(),
            why: "is 0: a model needs at least one attention head".into(),
        });
    }
    let n_head_kv = conv.head_count_kv(cfg)?;
    if n_head_kv == 0 {
        return Err(ConvertError::Config {
            field: "num_key_value_heads".into(),
            why: "is 0: attention needs at least one key/value head".into(),
        });
    }
    let head_dim = cfg.opt_usize("head_dim")?.unwrap_or(d / n_head);
    let n_vocab = cfg.usize("vocab_size")?;
    let n_expert = conv.expert_count(cfg)?;
    let n_used = conv.expert_used_count(cfg)?;
    if n_used == 0 || n_used > n_expert || n_used > moe_runtime::moe::router::MAX_EXPERTS_USED {
        return Err(ConvertError::Config {
            field: "num_experts_per_tok".into(),
            why: format!("{n_used} is not between 1 and the expert count {n_expert}"),
        });
    }
    if !conv.handles_rope_scaling() {
        check_rope_scaling(cfg)?;
    }

    // Metadata shared by all architectures, in llama.cpp's key names and value types.
    let mut meta: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(arch_name.into()),
        ),
        ("general.type".into(), Value::String("model".into())),
        (
            "general.name".into(),
            Value::String(
                ckpt.dir
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into()),
            ),
        ),
        (
            "general.file_type".into(),
            Value::U32(mix.map_or_else(|| file_type(ty), Mix::file_type)),
        ),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let mut put = |k: &str, v: Value| meta.push((format!("{arch_name}.{k}"), v));
    put(
        "context_length",
        Value::U32(cfg.opt_usize("max_position_embeddings")?.unwrap_or(4096) as u32),
    );
    put("embedding_length", Value::U32(d as u32));
    put("block_count", Value::U32(n_layer as u32));
    put(
        "feed_forward_length",
        Value::U32(conv.feed_forward_length(cfg)? as u32),
    );
    put("attention.head_count", Value::U32(n_head as u32));
    put("attention.head_count_kv", Value::U32(n_head_kv as u32));
    put("rope.freq_base", Value::F32(rope_theta(cfg)? as f32));
    put(
        "attention.layer_norm_rms_epsilon",
        Value::F32(conv.rms_eps(cfg)? as f32),
    );
    put("expert_count", Value::U32(n_expert as u32));
    put("expert_used_count", Value::U32(n_used as u32));
    // llama.cpp hard-codes this per architecture; moe-edge reads it so that checkpoints whose
    // config differs from the usual value still run correctly.
    put("expert_weights_norm", Value::Bool(conv.norm_topk(cfg)?));
    if cfg.opt_usize("head_dim")?.is_some() {
        put("attention.key_length", Value::U32(head_dim as u32));
        put("attention.value_length", Value::U32(head_dim as u32));
    }
    if let Some(w) = cfg.opt_usize("sliding_window")? {
        if cfg.opt_bool("use_sliding_window")?.unwrap_or(true) {
            put("attention.sliding_window", Value::U32(w as u32));
        }
    }
    for (k, v) in conv.metadata(cfg)? {
        let full = format!("{arch_name}.{k}");
        meta.retain(|(existing, _)| *existing != full);
        meta.push((full, v));
    }

    // Tensors.
    let tied = !ckpt.has("lm_head.weight");
    let mut tensors = Vec::new();
    let mut add = |name: String, dims: Vec<usize>, source: Source| {
        let ty = match &source {
            Source::Packed(p) => p.ty(),
            _ => choose_type(&name, &dims, ty, tied),
        };
        tensors.push(PlannedTensor {
            decl: TensorDecl { name, dims, ty },
            source,
        });
    };
    let t = |s: &str| Source::Tensor(s.to_string());

    ckpt.expect_shape("model.embed_tokens.weight", &[n_vocab, d])?;
    add(
        "token_embd.weight".into(),
        vec![d, n_vocab],
        t("model.embed_tokens.weight"),
    );
    let norms = conv.hf_norms();
    for l in 0..n_layer {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let gg = |s: &str| format!("blk.{l}.{s}");
        let mixer_norm = hf(&format!("{}.weight", norms.mixer));
        ckpt.expect_shape(&mixer_norm, &[d])?;
        add(
            gg("attn_norm.weight"),
            vec![d],
            conv.norm_source(mixer_norm.clone()),
        );

        if let Some(own) = conv.attention(cfg, ckpt, l)? {
            for t in own {
                add(gg(&t.name), t.dims, t.source);
            }
        } else {
            let q_dim = n_head * head_dim;
            let kv_dim = n_head_kv * head_dim;
            for (proj, rows, heads) in [
                ("q", q_dim, n_head),
                ("k", kv_dim, n_head_kv),
                ("v", kv_dim, 0),
            ] {
                let w = hf(&format!("self_attn.{proj}_proj.weight"));
                ckpt.expect_shape(&w, &[rows, d])?;
                let permute = conv.permute_qk() && heads > 0;
                let src = |name: String| {
                    if permute {
                        Source::PermutedQk {
                            name,
                            n_head: heads,
                        }
                    } else {
                        Source::Tensor(name)
                    }
                };
                add(gg(&format!("attn_{proj}.weight")), vec![d, rows], src(w));
                let b = hf(&format!("self_attn.{proj}_proj.bias"));
                if ckpt.has(&b) {
                    ckpt.expect_shape(&b, &[rows])?;
                    add(gg(&format!("attn_{proj}.bias")), vec![rows], src(b));
                }
            }
            let o = hf("self_attn.o_proj.weight");
            ckpt.expect_shape(&o, &[d, q_dim])?;
            add(gg("attn_output.weight"), vec![q_dim, d], t(&o));
            let ob = hf("self_attn.o_proj.bias");
            if ckpt.has(&ob) {
                ckpt.expect_shape(&ob, &[d])?;
                add(gg("attn_output.bias"), vec![d], t(&ob));
            }
            for (which, full) in [("q", q_dim), ("k", kv_dim)] {
                let w = hf(&format!("self_attn.{which}_norm.weight"));
                if ckpt.has(&w) {
                    let len = ckpt.info(&w)?.shape.iter().product::<usize>();
                    if len != head_dim && len != full {
                        let found = ckpt.info(&w)?.shape.clone();
                        return Err(ConvertError::Shape {
                            name: w,
                            expected: vec![full],
                            found,
                        });
                    }
                    add(gg(&format!("attn_{which}_norm.weight")), vec![len], t(&w));
                }
            }
        }
        for extra in conv.extra_layer_tensors(cfg, ckpt, l)? {
            add(gg(&extra.name), extra.dims, extra.source);
        }
        let ffn_norm = hf(&format!("{}.weight", norms.ffn));
        ckpt.expect_shape(&ffn_norm, &[d])?;
        add(
            gg(&format!("{}.weight", arch.traits().ffn_norm_tensor)),
            vec![d],
            conv.norm_source(ffn_norm.clone()),
        );

        match conv.ffn(cfg, ckpt, l)? {
            FfnSource::Dense { gate, up, down } => {
                let ff = ckpt.info(&gate)?.shape.first().copied().unwrap_or(0);
                ckpt.expect_shape(&gate, &[ff, d])?;
                ckpt.expect_shape(&up, &[ff, d])?;
                ckpt.expect_shape(&down, &[d, ff])?;
                add(gg("ffn_gate.weight"), vec![d, ff], t(&gate));
                add(gg("ffn_up.weight"), vec![d, ff], t(&up));
                add(gg("ffn_down.weight"), vec![ff, d], t(&down));
            }
            FfnSource::Moe {
                router,
                experts,
                shared,
                selection_bias,
            } => {
                ckpt.expect_shape(&router, &[n_expert, d])?;
                add(gg("ffn_gate_inp.weight"), vec![d, n_expert], t(&router));
                if let Some(b) = selection_bias {
                    // ERNIE stores it as one row of a [1, n_expert] matrix.
                    if ckpt.info(&b)?.shape != [1, n_expert] {
                        ckpt.expect_shape(&b, &[n_expert])?;
                    }
                    add(gg("exp_probs_b.bias"), vec![n_expert], t(&b));
                }
                match experts {
                    ExpertSource::PerExpert { gate, up, down } => {
                        let ff = ckpt.info(&gate[0])?.shape.first().copied().unwrap_or(0);
                        for e in 0..n_expert {
                            ckpt.expect_shape(&gate[e], &[ff, d])?;
                            ckpt.expect_shape(&up[e], &[ff, d])?;
                            ckpt.expect_shape(&down[e], &[d, ff])?;
                        }
                        add(
                            gg("ffn_gate_exps.weight"),
                            vec![d, ff, n_expert],
                            Source::Stack(gate),
                        );
                        add(
                            gg("ffn_up_exps.weight"),
                            vec![d, ff, n_expert],
                            Source::Stack(up),
                        );
                        add(
                            gg("ffn_down_exps.weight"),
                            vec![ff, d, n_expert],
                            Source::Stack(down),
                        );
                    }
                    ExpertSource::Fused { gate_up, down } => {
                        let ff2 = ckpt.info(&gate_up)?.shape.get(1).copied().unwrap_or(0);
                        let ff = ff2 / 2;
                        ckpt.expect_shape(&gate_up, &[n_expert, 2 * ff, d])?;
                        ckpt.expect_shape(&down, &[n_expert, d, ff])?;
                        for (part, name) in [(0, "ffn_gate_exps.weight"), (1, "ffn_up_exps.weight")]
                        {
                            add(
                                gg(name),
                                vec![d, ff, n_expert],
                                Source::FusedHalf {
                                    name: gate_up.clone(),
                                    n_expert,
                                    part,
                                },
                            );
                        }
                        add(gg("ffn_down_exps.weight"), vec![ff, d, n_expert], t(&down));
                    }
                    ExpertSource::Prepared(prepared) => {
                        let PreparedExperts { gate, up, down, ff } = *prepared;
                        add(gg("ffn_gate_exps.weight"), vec![d, ff, n_expert], gate);
                        add(gg("ffn_up_exps.weight"), vec![d, ff, n_expert], up);
                        add(gg("ffn_down_exps.weight"), vec![ff, d, n_expert], down);
                    }
                }
                if let Some(sh) = shared {
                    let (gate_src, up_src, down_name, sff) = match sh.mlp {
                        ExpertMlp::Separate { gate, up, down } => {
                            let sff = ckpt.info(&gate)?.shape.first().copied().unwrap_or(0);
                            ckpt.expect_shape(&gate, &[sff, d])?;
                            ckpt.expect_shape(&up, &[sff, d])?;
                            (t(&gate), t(&up), down, sff)
                        }
                        ExpertMlp::Fused { gate_up, down } => {
                            let sff = ckpt.info(&gate_up)?.shape.first().copied().unwrap_or(0) / 2;
                            ckpt.expect_shape(&gate_up, &[2 * sff, d])?;
                            (
                                Source::MatrixHalf {
                                    name: gate_up.clone(),
                                    part: 0,
                                },
                                Source::MatrixHalf {
                                    name: gate_up,
                                    part: 1,
                                },
                                down,
                                sff,
                            )
                        }
                    };
                    ckpt.expect_shape(&down_name, &[d, sff])?;
                    add(gg("ffn_gate_shexp.weight"), vec![d, sff], gate_src);
                    add(gg("ffn_up_shexp.weight"), vec![d, sff], up_src);
                    add(gg("ffn_down_shexp.weight"), vec![sff, d], t(&down_name));
                    if let Some(g) = sh.gate {
                        ckpt.expect_shape(&g, &[1, d])?;
                        add(gg("ffn_gate_inp_shexp.weight"), vec![d], t(&g));
                    }
                }
            }
        }
    }
    for extra in conv.extra_tensors(cfg)? {
        add(extra.name, extra.dims, extra.source);
    }
    let output_norm = format!("{}.weight", norms.output);
    ckpt.expect_shape(&output_norm, &[d])?;
    add(
        format!("{}.weight", arch.traits().output_norm_tensor),
        vec![d],
        conv.norm_source(output_norm.clone()),
    );
    if !tied {
        ckpt.expect_shape("lm_head.weight", &[n_vocab, d])?;
        add(
            "output.weight".into(),
            vec![d, n_vocab],
            t("lm_head.weight"),
        );
    } else if conv.requires_output_tensor() {
        // llama.cpp has no tied-embedding fallback for this architecture.
        add(
            "output.weight".into(),
            vec![d, n_vocab],
            t("model.embed_tokens.weight"),
        );
    }

    if crate::router::present(cfg)? {
        let (router_meta, router_tensors) =
            crate::router::plan(ckpt, rope_theta(cfg)?, n_vocab, n_expert)?;
        meta.extend(router_meta);
        for (name, dims, source) in router_tensors {
            add(name, dims, source);
        }
    }

    if let Some(mix) = mix {
        let shape = ModelShape {
            n_layer,
            n_expert,
            n_gqa: n_head / n_head_kv,
            tied_output: !tensors.iter().any(|t| t.decl.name == "output.weight"),
        };
        apply_mix(&mut tensors, mix, shape, tied, has_imatrix);
    }

    Ok(Plan {
        arch_name,
        metadata: meta,
        tensors,
    })
}

/// Retypes planned tensors as llama-quantize would retype an f16 file of them with `mix`; the
/// tensors it leaves alone keep their f16 file's type, and pre-packed ones (gpt-oss's MXFP4
/// experts) their own.
fn apply_mix(
    tensors: &mut [PlannedTensor],
    mix: Mix,
    shape: ModelShape,
    tied: bool,
    has_imatrix: bool,
) {
    let named: Vec<(&str, &[usize])> = tensors
        .iter()
        .map(|t| (t.decl.name.as_str(), t.decl.dims.as_slice()))
        .collect();
    let types = mix.tensor_types(&named, shape, has_imatrix, |i| {
        choose_type(named[i].0, named[i].1, GgmlType::F16, tied)
    });
    for (t, ty) in tensors.iter_mut().zip(types) {
        if !matches!(t.source, Source::Packed(_)) {
            t.decl.ty = ty;
        }
    }
}

/// `rope_theta` at the top level (transformers 4) or in `rope_parameters` (transformers 5).
fn rope_theta(cfg: &Config) -> Result<f64, ConvertError> {
    if let Some(t) = cfg.opt_f64("rope_theta")? {
        return Ok(t);
    }
    if let Some(t) = cfg
        .get("rope_parameters")
        .and_then(|p| p.get("rope_theta"))
        .and_then(|v| v.as_f64())
    {
        return Ok(t);
    }
    Ok(10000.0)
}

fn check_rope_scaling(cfg: &Config) -> Result<(), ConvertError> {
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(p) = cfg.get(key) {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(ConvertError::Config {
                    field: key.into(),
                    why: format!("rope scaling `{kind}` is not supported yet"),
                });
            }
        }
    }
    Ok(())
}
