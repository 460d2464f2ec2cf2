//! llama.cpp's named quantization mixes (`Q4_K_M`, `Q3_K_S`, ...) and the k-quant and IQ4 types:
//! which type each tensor gets, as llama-quantize decides it (`llama_tensor_get_type` in
//! src/llama-quant.cpp of llama.cpp 0c1e57098), so that a file from `moe-convert --type q4_k_m`
//! has the types, and with the same encoders the bytes, of `llama-quantize F16 OUT Q4_K_M`.
//!
//! Only the rules that can fire for the mixes offered here are ported; Falcon's and 70B's,
//! the IQ1-IQ3 mixes' and `--output-tensor-type`-style overrides are not. One deviation: ggml
//! falls back from Q5_K to Q5_1 for rows that are not whole super-blocks, a type moe-edge does
//! not read; Q5_0 is used instead.

use moe_runtime::gguf::GgmlType;

/// A mix: llama.cpp's `LLAMA_FTYPE_MOSTLY_*` of that name, or one type for every quantizable
/// tensor (`Pure`, as `llama-quantize --pure`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    Q2K,
    Q3KS,
    Q3KM,
    Q3KL,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
    IQ4NL,
    IQ4XS,
    Pure(GgmlType),
}

/// The names `--type` takes for mixes, with what each is (for `--help` and errors).
pub const MIX_NAMES: &[(&str, &str)] = &[
    ("q2_k", "llama.cpp's Q2_K mix"),
    ("q3_k_s", "llama.cpp's Q3_K_S mix"),
    ("q3_k_m", "llama.cpp's Q3_K_M mix"),
    ("q3_k_l", "llama.cpp's Q3_K_L mix"),
    ("q4_k_s", "llama.cpp's Q4_K_S mix"),
    ("q4_k_m", "llama.cpp's Q4_K_M mix"),
    ("q5_k_s", "llama.cpp's Q5_K_S mix"),
    ("q5_k_m", "llama.cpp's Q5_K_M mix"),
    ("q6_k", "llama.cpp's Q6_K mix"),
    ("iq4_nl", "llama.cpp's IQ4_NL mix"),
    ("iq4_xs", "llama.cpp's IQ4_XS mix"),
    ("q3_k", "Q3_K for every quantizable tensor"),
    ("q4_k", "Q4_K for every quantizable tensor"),
    ("q5_k", "Q5_K for every quantizable tensor"),
];

/// The model-wide facts the rules look at.
#[derive(Clone, Copy, Debug)]
pub struct ModelShape {
    pub n_layer: usize,
    pub n_expert: usize,
    /// Query heads per key/value head (`n_gqa`).
    pub n_gqa: usize,
    /// No `output.weight`: the token embedding is the output projection too.
    pub tied_output: bool,
}

/// The broad tensor kinds llama.cpp's rules name (`tensor_get_category`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    AttnQ,
    AttnV,
    AttnK,
    AttnQkv,
    AttnKvB,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Output,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    let has = |s: &str| name.contains(s);
    if name == "output.weight" {
        Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        TokenEmbd
    } else if has("attn_qkv.weight") {
        AttnQkv
    } else if has("attn_kv_b.weight") {
        AttnKvB
    } else if has("attn_v.weight") {
        AttnV
    } else if has("attn_k.weight") {
        AttnK
    } else if has("attn_q.weight") {
        AttnQ
    } else if has("attn_output.weight") {
        AttnOutput
    } else if has("ffn_up") {
        FfnUp
    } else if has("ffn_gate") {
        FfnGate
    } else if has("ffn_down") {
        FfnDown
    } else {
        Other
    }
}

fn is_attn_v_like(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// The layer of a `blk.N.` tensor (-1 for the others), as llama.cpp's tensor order uses it.
fn layer_of(name: &str) -> i64 {
    name.strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

/// Whether llama-quantize quantizes a tensor (`tensor_allows_quantization`, the parts that
/// concern moe-edge's architectures): two or more dimensions of more than one element, a
/// `weight`, and not a norm, router or convolution.
pub fn quantizable(name: &str, dims: &[usize]) -> bool {
    let n_dims = dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1);
    n_dims >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && !name.contains("ffn_gate_tid2eid.weight")
        && !name.contains("altup")
        && !name.contains("laurel")
        && !name.contains("per_layer_model_proj")
        && !name.contains("ssm_conv1d")
        && !name.contains("shortconv.conv.weight")
        && !name.starts_with(crate::router::PREFIX)
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between.
fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

impl Mix {
    pub fn from_name(s: &str) -> Option<Self> {
        use Mix::*;
        Some(match s.to_ascii_lowercase().as_str() {
            "q2_k" => Q2K,
            "q3_k_s" => Q3KS,
            "q3_k_m" => Q3KM,
            "q3_k_l" => Q3KL,
            "q4_k_s" => Q4KS,
            "q4_k_m" => Q4KM,
            "q5_k_s" => Q5KS,
            "q5_k_m" => Q5KM,
            "q6_k" => Q6K,
            "iq4_nl" => IQ4NL,
            "iq4_xs" => IQ4XS,
            "q3_k" => Pure(GgmlType::Q3K),
            "q4_k" => Pure(GgmlType::Q4K),
            "q5_k" => Pure(GgmlType::Q5K),
            _ => return None,
        })
    }

    /// The type of the tensors no rule singles out (`llama_ftype_get_default_type`).
    pub fn default_type(self) -> GgmlType {
        use Mix::*;
        match self {
            Q2K => GgmlType::Q2K,
            Q3KS | Q3KM | Q3KL => GgmlType::Q3K,
            Q4KS | Q4KM => GgmlType::Q4K,
            Q5KS | Q5KM => GgmlType::Q5K,
            Q6K => GgmlType::Q6K,
            IQ4NL => GgmlType::IQ4NL,
            IQ4XS => GgmlType::IQ4XS,
            Pure(t) => t,
        }
    }

    /// `general.file_type` (enum llama_ftype).
    pub fn file_type(self) -> u32 {
        use Mix::*;
        match self {
            Q2K => 10,
            Q3KS => 11,
            Q3KM => 12,
            Q3KL => 13,
            Q4KS => 14,
            Q4KM => 15,
            Q5KS => 16,
            Q5KM => 17,
            Q6K => 18,
            IQ4NL => 25,
            IQ4XS => 30,
            // A pure k-quant file is labelled as llama.cpp's medium mix of its type.
            Pure(GgmlType::Q3K) => 12,
            Pure(GgmlType::Q5K) => 17,
            Pure(_) => 15,
        }
    }

    /// Types for the tensors `(name, dims)`, in their order: `keep(i)` is the type tensor i has
    /// when llama-quantize leaves it alone (its type in the f16 source file). `has_imatrix` as
    /// llama.cpp's `qs.has_imatrix`.
    pub fn tensor_types(
        self,
        tensors: &[(&str, &[usize])],
        shape: ModelShape,
        has_imatrix: bool,
        keep: impl Fn(usize) -> GgmlType,
    ) -> Vec<GgmlType> {
        let n_attention_wv = tensors
            .iter()
            .filter(|(n, _)| is_attn_v_like(category(n)))
            .count() as i64;
        // llama-quantize visits tensors by layer, then name (the loader's weights_map order);
        // the attn_v counter follows that order.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by(|&a, &b| {
            let (na, nb) = (tensors[a].0, tensors[b].0);
            (layer_of(na), na).cmp(&(layer_of(nb), nb))
        });
        let mut i_attention_wv = 0i64;
        let mut out = vec![GgmlType::F32; tensors.len()];
        for i in order {
            let (name, dims) = tensors[i];
            out[i] = if quantizable(name, dims) {
                let cat = category(name);
                let mut ty = self.default_type();
                if !matches!(self, Mix::Pure(_)) {
                    ty = self.rule(
                        cat,
                        name,
                        dims,
                        shape,
                        has_imatrix,
                        i_attention_wv,
                        n_attention_wv,
                    );
                }
                if is_attn_v_like(cat) {
                    i_attention_wv += 1;
                }
                fallback(ty, dims[0])
            } else {
                keep(i)
            };
        }
        out
    }

    /// `llama_tensor_get_type_impl` for this mix.
    #[allow(clippy::too_many_arguments)]
    fn rule(
        self,
        cat: Category,
        name: &str,
        dims: &[usize],
        shape: ModelShape,
        has_imatrix: bool,
        i_attention_wv: i64,
        n_attention_wv: i64,
    ) -> GgmlType {
        use GgmlType as T;
        use Mix::*;
        let mut ty = self.default_type();
        let eight_experts = shape.n_expert == 8;
        let n_layer = shape.n_layer as i64;
        if cat == Category::Output || (shape.tied_output && cat == Category::TokenEmbd) {
            let qk = ty.block_len();
            return if !dims[0].is_multiple_of(qk) {
                T::Q8_0
            } else if ty != T::Q8_0 {
                T::Q6K
            } else {
                ty
            };
        }
        match cat {
            c if is_attn_v_like(c) => {
                match self {
                    Q2K => ty = if shape.n_gqa >= 4 { T::Q4K } else { T::Q3K },
                    Q3KM => ty = if i_attention_wv < 2 { T::Q5K } else { T::Q4K },
                    Q3KL => ty = T::Q5K,
                    IQ4NL | IQ4XS if shape.n_gqa >= 4 => ty = T::Q5K,
                    Q4KM | Q5KM if use_more_bits(i_attention_wv, n_attention_wv) => ty = T::Q6K,
                    Q4KS if i_attention_wv < 4 => ty = T::Q5K,
                    _ => {}
                }
                if eight_experts {
                    ty = T::Q8_0;
                }
            }
            Category::AttnK if eight_experts => ty = T::Q8_0,
            Category::FfnDown => {
                // With experts, the layer comes from the name (llama.cpp's layer_info).
                let i_layer = layer_of(name);
                match self {
                    Q2K => ty = T::Q3K,
                    Q3KM => {
                        ty = if i_layer < n_layer / 16 {
                            T::Q5K
                        } else {
                            T::Q4K
                        }
                    }
                    Q3KL => ty = T::Q5K,
                    Q4KM if use_more_bits(i_layer, n_layer) => ty = T::Q6K,
                    IQ4NL | IQ4XS if i_layer < n_layer / 8 && !has_imatrix => ty = T::Q5K,
                    Q5KM if use_more_bits(i_layer, n_layer) => ty = T::Q6K,
                    Q4KS if i_layer < n_layer / 8 => ty = T::Q5K,
                    _ => {}
                }
            }
            Category::AttnOutput => {
                if eight_experts {
                    if matches!(self, Q2K | Q3KS | Q3KM | IQ4NL | Q4KS | Q4KM | IQ4XS) {
                        ty = T::Q5K;
                    }
                } else {
                    match self {
                        Q2K => ty = T::Q3K,
                        Q3KM => ty = T::Q4K,
                        Q3KL => ty = T::Q5K,
                        _ => {}
                    }
                }
            }
            Category::AttnQkv => unreachable!("attn_v-like"),
            _ => {}
        }
        ty
    }
}

/// llama.cpp's `tensor_type_fallback` for rows of `ncols` values that are not whole blocks of
/// `ty` (Q5_1 replaced by Q5_0, see the module docs).
pub fn fallback(ty: GgmlType, ncols: usize) -> GgmlType {
    use GgmlType as T;
    if ncols.is_multiple_of(ty.block_len()) {
        return ty;
    }
    let to = match ty {
        T::IQ1S | T::IQ1M | T::IQ2XXS | T::IQ2XS | T::IQ2S | T::IQ3XXS | T::IQ3S | T::IQ4XS => {
            T::IQ4NL
        }
        T::Q2K | T::Q3K => T::Q4_0,
        T::Q4K | T::Q5K => T::Q5_0,
        T::Q6K => T::Q8_0,
        other => other,
    };
    if ncols.is_multiple_of(to.block_len()) {
        to
    } else {
        T::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_matches_llama_cpp_on_six_layers() {
        // n/8 = 0, 7n/8 = 5: layers 2 and 5 (every third from the first) and the last.
        let got: Vec<i64> = (0..6).filter(|&l| use_more_bits(l, 6)).collect();
        assert_eq!(got, [2, 5]);
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        use GgmlType as T;
        assert_eq!(fallback(T::Q4K, 64), T::Q5_0);
        assert_eq!(fallback(T::Q2K, 96), T::Q4_0);
        assert_eq!(fallback(T::Q6K, 32), T::Q8_0);
        assert_eq!(fallback(T::IQ4XS, 64), T::IQ4NL);
        assert_eq!(fallback(T::Q4K, 48), T::F16);
        assert_eq!(fallback(T::Q4K, 512), T::Q4K);
    }
}
