//! Calibration-driven changes to a converted file: pruning experts and per-expert precision.
//!
//! The model is first converted to f32; calibration runs on that file; then the final file is
//! written from it, with pruned experts' router rows and slabs left out and every tensor
//! quantized to its type (`crate::rewrite`). Pruning keeps the same number of experts in every MoE layer, because
//! llama.cpp's GGUF has one `expert_count` for all layers: a file pruned this way stays a valid
//! llama.cpp file. Mixed precision uses moe-edge's per-expert layout (see
//! `moe_runtime::moe::calib`), which llama.cpp does not load; it is written only on request.

use moe_runtime::gguf::GgmlType;
use moe_runtime::moe::calib::CalibStats;

use crate::error::ConvertError;

/// Which experts to keep.
#[derive(Clone, Debug, PartialEq)]
pub enum PruneSpec {
    /// The `n` most frequently selected experts of every layer.
    Top(usize),
    /// In every layer, the most used experts covering this fraction of the router mass; the
    /// count is the largest any layer needs, so all layers keep the same number.
    Mass(f64),
    /// Drop exactly these (layer, expert) pairs; every MoE layer must lose the same number.
    Drop(Vec<(usize, usize)>),
}

impl PruneSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not top:N, mass:F (0 < F <= 1) or drop:L:E,L:E,...");
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "top" => rest
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .map(Self::Top)
                .ok_or_else(bad),
            "mass" => rest
                .parse()
                .ok()
                .filter(|&f: &f64| f > 0.0 && f <= 1.0)
                .map(Self::Mass)
                .ok_or_else(bad),
            "drop" => rest
                .split(',')
                .map(|p| {
                    let (l, e) = p.split_once(':')?;
                    Some((l.trim().parse().ok()?, e.trim().parse().ok()?))
                })
                .collect::<Option<Vec<_>>>()
                .map(Self::Drop)
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }

    pub fn needs_stats(&self) -> bool {
        !matches!(self, Self::Drop(_))
    }

    /// The experts each layer keeps, in their original order (`moe_layers[l]` says whether
    /// layer `l` has routed experts; dense layers keep nothing).
    pub fn kept(
        &self,
        moe_layers: &[bool],
        n_expert: usize,
        stats: Option<&CalibStats>,
    ) -> Result<Vec<Vec<usize>>, ConvertError> {
        let need = || {
            ConvertError::Input(
                "--prune-experts top:/mass: rank experts by calibration statistics: add --calib TEXT"
                    .into(),
            )
        };
        // The first `n` of each MoE layer's ranking, in index order.
        let keep_n = |n: usize, rank: &dyn Fn(usize) -> Vec<usize>| -> Vec<Vec<usize>> {
            moe_layers
                .iter()
                .enumerate()
                .map(|(l, &moe)| {
                    if !moe {
                        return Vec::new();
                    }
                    let mut ks: Vec<usize> = rank(l).into_iter().take(n).collect();
                    ks.sort_unstable();
                    ks
                })
                .collect()
        };
        let kept = match self {
            Self::Top(n) => {
                if *n > n_expert {
                    return Err(ConvertError::Input(format!(
                        "--prune-experts top:{n} keeps more experts than the model's {n_expert}"
                    )));
                }
                let stats = stats.ok_or_else(need)?;
                keep_n(*n, &|l| stats.by_frequency(l))
            }
            Self::Mass(f) => {
                let stats = stats.ok_or_else(need)?;
                let mut n = 1;
                for (l, _) in moe_layers.iter().enumerate().filter(|(_, &m)| m) {
                    let mut mass: Vec<f32> = (0..n_expert)
                        .map(|e| stats.router_mass[stats.idx(l, e)])
                        .collect();
                    mass.sort_by(|a, b| b.total_cmp(a));
                    let total: f32 = mass.iter().sum();
                    let mut cum = 0f32;
                    let mut need = n_expert;
                    for (i, m) in mass.iter().enumerate() {
                        cum += m;
                        if cum as f64 >= f * total as f64 - 1e-6 {
                            need = i + 1;
                            break;
                        }
                    }
                    n = n.max(need);
                }
                keep_n(n, &|l| stats.by_mass(l))
            }
            Self::Drop(list) => {
                for &(l, e) in list {
                    if !moe_layers.get(l).copied().unwrap_or(false) || e >= n_expert {
                        return Err(ConvertError::Input(format!(
                            "--prune-experts drop:{l}:{e}: layer {l} has no routed expert {e} ({} layers, {n_expert} experts)",
                            moe_layers.len()
                        )));
                    }
                }
                let kept: Vec<Vec<usize>> = moe_layers
                    .iter()
                    .enumerate()
                    .map(|(l, &moe)| {
                        if !moe {
                            return Vec::new();
                        }
                        (0..n_expert).filter(|e| !list.contains(&(l, *e))).collect()
                    })
                    .collect();
                let counts: Vec<usize> = kept
                    .iter()
                    .zip(moe_layers)
                    .filter(|(_, &m)| m)
                    .map(|(k, _)| k.len())
                    .collect();
                if counts.windows(2).any(|w| w[0] != w[1]) {
                    return Err(ConvertError::Input(format!(
                        "--prune-experts drop: every MoE layer must lose the same number of experts (GGUF has one expert_count for all layers); the list leaves {counts:?}"
                    )));
                }
                kept
            }
        };
        Ok(kept)
    }
}

/// Per-expert types: experts in `hot[l]` get `hot_ty`, the others `cold_ty`.
#[derive(Clone, Debug)]
pub struct ExpertTypes {
    pub hot_ty: GgmlType,
    pub cold_ty: GgmlType,
    pub hot_fraction: f64,
}

impl ExpertTypes {
    /// Parses `hot=q8_0,cold=q4_0`.
    pub fn parse(s: &str, hot_fraction: f64) -> Result<Self, String> {
        let (mut hot, mut cold) = (None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not hot=TYPE or cold=TYPE"))?;
            let ty = GgmlType::from_name(v.trim())
                // Per-expert k-quants are not offered yet: their per-expert layout is untested.
                .filter(|t| {
                    matches!(
                        t,
                        GgmlType::F32
                            | GgmlType::F16
                            | GgmlType::BF16
                            | GgmlType::Q8_0
                            | GgmlType::Q4_0
                    )
                })
                .ok_or_else(|| format!("`{v}` is not one of f32, f16, bf16, q8_0, q4_0"))?;
            match k.trim() {
                "hot" => hot = Some(ty),
                "cold" => cold = Some(ty),
                _ => return Err(format!("`{k}` is not hot or cold")),
            }
        }
        match (hot, cold) {
            (Some(hot_ty), Some(cold_ty)) => Ok(Self {
                hot_ty,
                cold_ty,
                hot_fraction,
            }),
            _ => Err(format!("`{s}` must give both, e.g. hot=q8_0,cold=q4_0")),
        }
    }

    /// Per layer, per kept expert: hot or not. The `ceil(fraction * n)` most frequently
    /// selected experts of each layer are hot.
    pub fn hot_sets(&self, kept: &[Vec<usize>], stats: &CalibStats) -> Vec<Vec<bool>> {
        kept.iter()
            .enumerate()
            .map(|(l, ks)| {
                let n_hot = (self.hot_fraction * ks.len() as f64).ceil() as usize;
                let mut order: Vec<usize> = (0..ks.len()).collect();
                order.sort_by(|&a, &b| {
                    stats.frequency[stats.idx(l, ks[b])]
                        .total_cmp(&stats.frequency[stats.idx(l, ks[a])])
                        .then(a.cmp(&b))
                });
                let mut hot = vec![false; ks.len()];
                for &i in order.iter().take(n_hot) {
                    hot[i] = true;
                }
                hot
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prune_specs() {
        assert_eq!(PruneSpec::parse("top:6"), Ok(PruneSpec::Top(6)));
        assert_eq!(PruneSpec::parse("mass:0.9"), Ok(PruneSpec::Mass(0.9)));
        assert_eq!(
            PruneSpec::parse("drop:0:1, 2:3"),
            Ok(PruneSpec::Drop(vec![(0, 1), (2, 3)]))
        );
        for bad in ["top:0", "mass:1.5", "drop:1", "keep:3", "top"] {
            assert!(PruneSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn drop_list_must_be_uniform() {
        let spec = PruneSpec::parse("drop:0:1,1:2").unwrap();
        let kept = spec.kept(&[true, true], 4, None).unwrap();
        assert_eq!(kept, vec![vec![0, 2, 3], vec![0, 1, 3]]);
        let spec = PruneSpec::parse("drop:0:1,0:2,1:2").unwrap();
        assert!(spec.kept(&[true, true], 4, None).is_err());
        assert!(PruneSpec::parse("drop:5:1")
            .unwrap()
            .kept(&[true, true], 4, None)
            .is_err());
    }

    #[test]
    fn top_and_mass_follow_statistics() {
        let mut s = CalibStats::new(1, 4);
        s.frequency = vec![0.1, 0.9, 0.5, 0.5];
        s.router_mass = vec![0.05, 0.6, 0.25, 0.1];
        let kept = PruneSpec::Top(2).kept(&[true], 4, Some(&s)).unwrap();
        assert_eq!(kept, vec![vec![1, 2]]);
        // 0.6 + 0.25 = 0.85 of 1.0 mass covers 0.8.
        let kept = PruneSpec::Mass(0.8).kept(&[true], 4, Some(&s)).unwrap();
        assert_eq!(kept, vec![vec![1, 2]]);
        let types = ExpertTypes::parse("hot=q8_0,cold=q4_0", 0.25).unwrap();
        assert_eq!(
            types.hot_sets(&[vec![0, 1, 2, 3]], &s),
            vec![vec![false, true, false, false]]
        );
    }
}
