//! `moe-convert --target-size`: each routed expert matrix's type chosen to lose the least within
//! a byte budget.
//!
//! The loss of storing expert `e`'s matrix `m` (gate, up or down) of layer `l` at type `T` is
//! estimated as
//!
//! ```text
//! loss(l, e, m, T) = sensitivity(l, e) * rel_err(l, e, m, T)
//! ```
//!
//! - `rel_err` is the matrix's quantisation error relative to the matrix, each column weighted
//!   by the mean square of its input over the calibration text (the importance matrix, when
//!   there is one; else uniform): `sum_c w_c sum_r (x - q(x))^2 / sum_c w_c sum_r x^2`, the
//!   diagonal approximation of `E|dW a|^2 / E|W a|^2` for the expert's inputs `a`. The
//!   encoders run with the same importance weights as the final file's.
//! - `sensitivity` is the expert's measured output error when it is taken out of its router's
//!   choice (`drop_kl`, KL divergence of the next-token distribution over the calibration
//!   text): it already carries how often the expert is selected and how much the output depends
//!   on it. The KL of a small perturbation grows with its square, so an expert whose output is
//!   off by a fraction `sqrt(rel_err)` costs about `rel_err` of what removing it costs. A small
//!   floor keeps experts that calibration never selected from dropping to nothing.
//!
//! The choice minimises the summed loss within the budget: a Lagrangian sweep (each matrix picks
//! the type minimising `loss + lambda * bytes`; `lambda` bisected to the budget), then the bytes
//! left over go to the upgrades with the best loss saved per byte. Non-expert tensors keep the
//! types the `--type` mix gives them; their bytes come off the budget first.

use std::collections::BTreeMap;

use moe_runtime::gguf::{align_up, GgmlType, GgufFile, PAGE_ALIGNMENT};
use moe_runtime::moe::calib::CalibStats;
use moe_runtime::tensor::quant::{dequantize, quantize_weighted};
use rayon::prelude::*;

use crate::error::ConvertError;
use crate::imatrix::Imatrix;

/// The routed expert matrices, in the order of the per-expert layout.
pub const MATRICES: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];

/// Types an expert matrix may get, from fewest to most bits. Rows that are not whole 256-value
/// super-blocks take llama.cpp's fallback for each (`mix::fallback`).
pub const CANDIDATES: [GgmlType; 7] = [
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::IQ4XS,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Q8_0,
];

/// Rows of a matrix the error is measured on (see [`sample_rows`]).
const SAMPLE_ROWS: usize = 128;

/// The sensitivity floor, as a share of the mean `drop_kl` of the experts.
const SENSITIVITY_FLOOR: f64 = 0.02;

/// A byte budget: a file size or bits per weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    Bytes(u64),
    BitsPerWeight(f64),
}

impl Target {
    /// Parses `120MiB`, `1.5G`, `3000000` (bytes) or `3.5bpw`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        if let Some(num) = lower.strip_suffix("bpw") {
            let bpw: f64 = num
                .trim()
                .parse()
                .map_err(|_| format!("`{s}`: bits per weight must be a number, e.g. 3.5bpw"))?;
            if !(1.0..=32.0).contains(&bpw) {
                return Err(format!("`{s}`: bits per weight must be between 1 and 32"));
            }
            return Ok(Self::BitsPerWeight(bpw));
        }
        let split = lower
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(lower.len());
        let (num, unit) = lower.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size such as 120MiB, 1.5GB or 3.5bpw"))?;
        let scale = match unit.trim() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "kib" => 1024.0,
            "m" | "mb" => 1e6,
            "mib" => (1u64 << 20) as f64,
            "g" | "gb" => 1e9,
            "gib" => (1u64 << 30) as f64,
            other => {
                return Err(format!(
                    "`{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB, MB, GB or bpw)"
                ))
            }
        };
        let bytes = (num * scale).round();
        if bytes < 1.0 {
            return Err(format!("`{s}` is not a positive size"));
        }
        Ok(Self::Bytes(bytes as u64))
    }

    /// The budget in bytes for a file of `n_params` weights.
    pub fn bytes(self, n_params: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::BitsPerWeight(bpw) => (bpw * n_params as f64 / 8.0) as u64,
        }
    }
}

/// How finely types may vary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One type per expert matrix (moe-edge's per-expert layout).
    PerExpert,
    /// One type per stacked tensor (llama.cpp's layout: all experts of a layer's gate, up or
    /// down share it), so llama.cpp loads the file.
    Stacked,
}

/// One expert matrix's measured options.
#[derive(Clone, Debug)]
struct Unit {
    layer: usize,
    /// Position among the layer's kept experts.
    slot: usize,
    matrix: usize,
    /// (type, bytes in the file, loss), cheapest first, dominated options removed.
    options: Vec<(GgmlType, u64, f64)>,
}

/// The chosen types and what they are expected to cost.
#[derive(Clone, Debug)]
pub struct Allocation {
    /// `types[l][slot][m]`: the type of kept expert `slot`'s matrix `MATRICES[m]` in layer `l`
    /// (empty for layers without routed experts).
    pub types: Vec<Vec<[GgmlType; 3]>>,
    pub granularity: Granularity,
    /// Bytes of the routed experts as allocated (page-aligned as written).
    pub expert_bytes: u64,
    /// Bytes of everything else (header, non-expert tensors).
    pub fixed_bytes: u64,
    pub budget: u64,
    /// Summed estimated loss (KL nats, see the module docs).
    pub loss: f64,
    pub params: u64,
}

impl Allocation {
    pub fn expected_bytes(&self) -> u64 {
        self.expert_bytes + self.fixed_bytes
    }

    /// Per layer, how many expert matrices got each type; then the totals.
    pub fn report(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let mut total: BTreeMap<&'static str, usize> = BTreeMap::new();
        let _ = writeln!(
            s,
            "expert types for --target-size ({}; gate/up/down matrices per type):",
            match self.granularity {
                Granularity::PerExpert => "one type per expert matrix",
                Granularity::Stacked => "one type per stacked tensor",
            }
        );
        for (l, layer) in self.types.iter().enumerate() {
            if layer.is_empty() {
                continue;
            }
            let mut counts: BTreeMap<&'static str, [usize; 3]> = BTreeMap::new();
            for tys in layer {
                for (m, t) in tys.iter().enumerate() {
                    counts.entry(t.name()).or_default()[m] += 1;
                    *total.entry(t.name()).or_default() += 1;
                }
            }
            let parts: Vec<String> = counts
                .iter()
                .map(|(t, c)| format!("{t} {}/{}/{}", c[0], c[1], c[2]))
                .collect();
            let _ = writeln!(s, "  layer {l:>3}: {}", parts.join(", "));
        }
        let parts: Vec<String> = total.iter().map(|(t, n)| format!("{t} {n}")).collect();
        let _ = writeln!(s, "  all layers: {}", parts.join(", "));
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let _ = writeln!(
            s,
            "expected size {:.2} MiB ({:.2} MiB experts + {:.2} MiB the rest) of a {:.2} MiB budget, {:.3} bits per weight",
            mib(self.expected_bytes()),
            mib(self.expert_bytes),
            mib(self.fixed_bytes),
            mib(self.budget),
            self.expected_bytes() as f64 * 8.0 / self.params.max(1) as f64
        );
        s
    }
}

/// What [`allocate`] needs to know about the model beyond the f32 file.
pub struct Inputs<'a> {
    /// The unquantised model (moe-convert's intermediate f32 file).
    pub file: &'a GgufFile,
    /// Per layer, the original indices of the kept experts (empty for dense layers).
    pub kept: &'a [Vec<usize>],
    pub stats: &'a CalibStats,
    pub imatrix: Option<&'a Imatrix>,
    /// Bytes of the file without its routed experts: header and every other tensor at its type.
    pub fixed_bytes: u64,
    /// Weights the output file holds (for bits per weight).
    pub params: u64,
    /// No expert matrix above this many bits per weight (the type's): the expert cache's slots
    /// are as large as the largest expert, so a cap keeps as many experts in a cache budget as
    /// a uniform file at that type does.
    pub max_type: Option<GgmlType>,
}

/// Bits per weight of a type.
fn bits(t: GgmlType) -> f64 {
    t.block_bytes() as f64 * 8.0 / t.block_len() as f64
}

/// An even sample of at most [`SAMPLE_ROWS`] of the f32 rows of `ncols` values in `bytes` (the
/// intermediate file's map): rows are quantised independently, so it estimates the whole
/// matrix's error, and only the sample is ever copied out of the map.
fn sample_rows(bytes: &[u8], ncols: usize) -> Vec<f32> {
    let row_bytes = ncols * 4;
    let n_rows = bytes.len() / row_bytes;
    let step = n_rows.div_ceil(SAMPLE_ROWS).max(1);
    (0..n_rows)
        .step_by(step)
        .flat_map(|r| bytes[r * row_bytes..(r + 1) * row_bytes].chunks_exact(4))
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The weighted relative error of the rows `sample` (rows of `ncols`) stored as `ty`.
fn relative_error(ty: GgmlType, sample: &[f32], ncols: usize, weights: Option<&[f32]>) -> f64 {
    let q = quantize_weighted(ty, sample, ncols, weights);
    let mut back = vec![0f32; sample.len()];
    dequantize(ty, &q, &mut back);
    let (mut err, mut norm) = (0f64, 0f64);
    for (xr, br) in sample.chunks_exact(ncols).zip(back.chunks_exact(ncols)) {
        for c in 0..ncols {
            let w = weights.map_or(1.0, |w| w[c] as f64);
            let (x, b) = (xr[c] as f64, br[c] as f64);
            err += w * (x - b) * (x - b);
            norm += w * x * x;
        }
    }
    if norm > 0.0 {
        err / norm
    } else {
        0.0
    }
}

/// Each candidate type a matrix of `ncols`-value rows can take (fallbacks included, once each),
/// none above `max` (itself after its fallback).
fn candidates(ncols: usize, max: Option<GgmlType>) -> Vec<GgmlType> {
    let cap = max.map_or(f64::INFINITY, |m| bits(crate::mix::fallback(m, ncols)));
    let mut out: Vec<GgmlType> = Vec::new();
    for &t in &CANDIDATES {
        let t = crate::mix::fallback(t, ncols);
        if t.row_bytes(ncols).is_some() && !out.contains(&t) && bits(t) <= cap {
            out.push(t);
        }
    }
    if out.is_empty() {
        // A cap below every candidate: the smallest one.
        out.push(crate::mix::fallback(CANDIDATES[0], ncols));
    }
    out
}

/// Keeps the options on the lower convex hull of (bytes, loss): the ones some `lambda` picks.
/// Others are never worth their bytes.
fn hull(mut opts: Vec<(GgmlType, u64, f64)>) -> Vec<(GgmlType, u64, f64)> {
    opts.sort_by(|a, b| a.1.cmp(&b.1).then(a.2.total_cmp(&b.2)));
    let mut out: Vec<(GgmlType, u64, f64)> = Vec::new();
    for o in opts {
        if out.last().is_some_and(|l| o.2 >= l.2) {
            continue;
        }
        out.push(o);
    }
    out
}

/// Measures every expert matrix at every candidate type and chooses types within `target`.
pub fn allocate(
    inp: &Inputs,
    target: Target,
    granularity: Granularity,
) -> Result<Allocation, ConvertError> {
    let h = inp.file.header();
    let stats = inp.stats;
    let budget = target.bytes(inp.params);
    if stats.drop_kl.iter().all(|&v| v == 0.0) {
        return Err(ConvertError::Input(
            "--target-size weighs each expert by its measured output error: give --calib TEXT \
             with --calib-kl-tokens above 0"
                .into(),
        ));
    }
    let mean_kl = stats.drop_kl.iter().map(|&v| v as f64).sum::<f64>() / stats.drop_kl.len() as f64;
    let floor = SENSITIVITY_FLOOR * mean_kl;

    // Measure: one job per (layer, matrix, kept expert).
    struct Job<'a> {
        layer: usize,
        slot: usize,
        matrix: usize,
        expert: usize,
        /// The expert's matrix in the file's map, f32.
        bytes: &'a [u8],
        ncols: usize,
        weights: Option<&'a [f32]>,
    }
    struct Stacked<'a> {
        layer: usize,
        matrix: usize,
        bytes: &'a [u8],
        ncols: usize,
        nrows: usize,
        weights: Option<&'a [f32]>,
    }
    let mut slabs = Vec::new();
    for (l, kept) in inp.kept.iter().enumerate() {
        if kept.is_empty() {
            continue;
        }
        for (m, stem) in MATRICES.iter().enumerate() {
            let name = format!("blk.{l}.{stem}.weight");
            let info = h.tensor(&name).ok_or_else(|| {
                ConvertError::Input(format!("internal: `{name}` is missing from the f32 file"))
            })?;
            if info.ty != GgmlType::F32 || info.dims.len() != 3 {
                return Err(ConvertError::Input(format!(
                    "internal: `{name}` of the intermediate file is not a stacked f32 tensor"
                )));
            }
            let (ncols, nrows, n_expert) = (info.dims[0], info.dims[1], info.dims[2]);
            let weights = match inp.imatrix {
                Some(im) => im.for_tensor(&name, ncols, n_expert)?,
                None => None,
            };
            slabs.push(Stacked {
                layer: l,
                matrix: m,
                bytes: inp.file.tensor_bytes(info),
                ncols,
                nrows,
                weights,
            });
        }
    }
    let mut jobs = Vec::new();
    for st in &slabs {
        let per = st.ncols * st.nrows * 4;
        for (slot, &e) in inp.kept[st.layer].iter().enumerate() {
            jobs.push(Job {
                layer: st.layer,
                slot,
                matrix: st.matrix,
                expert: e,
                bytes: &st.bytes[e * per..(e + 1) * per],
                ncols: st.ncols,
                weights: st.weights.map(|w| &w[e * st.ncols..(e + 1) * st.ncols]),
            });
        }
    }
    let units: Vec<Unit> = jobs
        .par_iter()
        .map(|j| {
            let sens = stats.drop_kl[stats.idx(j.layer, j.expert)] as f64 + floor;
            let nrows = j.bytes.len() / (4 * j.ncols);
            let sample = sample_rows(j.bytes, j.ncols);
            let options = candidates(j.ncols, inp.max_type)
                .into_iter()
                .map(|t| {
                    let bytes = (t.row_bytes(j.ncols).expect("candidate fits") * nrows) as u64;
                    (
                        t,
                        bytes,
                        sens * relative_error(t, &sample, j.ncols, j.weights),
                    )
                })
                .collect();
            Unit {
                layer: j.layer,
                slot: j.slot,
                matrix: j.matrix,
                options,
            }
        })
        .collect();

    // Group into the units types vary by.
    let groups: Vec<Unit> = match granularity {
        Granularity::PerExpert => units
            .into_iter()
            .map(|mut u| {
                for o in &mut u.options {
                    o.1 = align_up(o.1, PAGE_ALIGNMENT as u64).expect("size fits");
                }
                u.options = hull(u.options);
                u
            })
            .collect(),
        Granularity::Stacked => {
            let mut by: BTreeMap<(usize, usize), Unit> = BTreeMap::new();
            for u in units {
                let g = by.entry((u.layer, u.matrix)).or_insert_with(|| Unit {
                    layer: u.layer,
                    slot: usize::MAX,
                    matrix: u.matrix,
                    options: u.options.iter().map(|o| (o.0, 0, 0.0)).collect(),
                });
                for (go, o) in g.options.iter_mut().zip(&u.options) {
                    go.1 += o.1;
                    go.2 += o.2;
                }
            }
            by.into_values()
                .map(|mut g| {
                    for o in &mut g.options {
                        o.1 = align_up(o.1, PAGE_ALIGNMENT as u64).expect("size fits");
                    }
                    g.options = hull(g.options);
                    g
                })
                .collect()
        }
    };

    let expert_budget = budget.checked_sub(inp.fixed_bytes).ok_or_else(|| {
        ConvertError::Input(format!(
            "--target-size {:.2} MiB is below the {:.2} MiB the file needs besides its routed \
             experts; give a larger size or a smaller --type for the other tensors",
            budget as f64 / (1u64 << 20) as f64,
            inp.fixed_bytes as f64 / (1u64 << 20) as f64
        ))
    })?;
    let min_bytes: u64 = groups.iter().map(|g| g.options[0].1).sum();
    if min_bytes > expert_budget {
        return Err(ConvertError::Input(format!(
            "--target-size {:.2} MiB is too small: the routed experts need at least {:.2} MiB at \
             the smallest types, the rest {:.2} MiB",
            budget as f64 / (1u64 << 20) as f64,
            min_bytes as f64 / (1u64 << 20) as f64,
            inp.fixed_bytes as f64 / (1u64 << 20) as f64
        )));
    }
    let choice = solve(&groups, expert_budget);

    let mut types: Vec<Vec<[GgmlType; 3]>> = inp
        .kept
        .iter()
        .map(|k| vec![[GgmlType::F32; 3]; k.len()])
        .collect();
    let (mut bytes, mut loss) = (0u64, 0f64);
    for (g, &c) in groups.iter().zip(&choice) {
        let (t, b, d) = g.options[c];
        bytes += b;
        loss += d;
        if g.slot == usize::MAX {
            for tys in &mut types[g.layer] {
                tys[g.matrix] = t;
            }
        } else {
            types[g.layer][g.slot][g.matrix] = t;
        }
    }
    Ok(Allocation {
        types,
        granularity,
        expert_bytes: bytes,
        fixed_bytes: inp.fixed_bytes,
        budget,
        loss,
        params: inp.params,
    })
}

/// The option index per group minimising the summed loss with the summed bytes within
/// `budget` (every group's first option must fit together).
fn solve(groups: &[Unit], budget: u64) -> Vec<usize> {
    let pick = |lambda: f64| -> Vec<usize> {
        groups
            .iter()
            .map(|g| {
                (0..g.options.len())
                    .min_by(|&a, &b| {
                        let cost = |i: usize| g.options[i].2 + lambda * g.options[i].1 as f64;
                        cost(a).total_cmp(&cost(b))
                    })
                    .expect("at least one option")
            })
            .collect()
    };
    let bytes = |c: &[usize]| -> u64 { groups.iter().zip(c).map(|(g, &i)| g.options[i].1).sum() };
    let mut choice = pick(0.0);
    if bytes(&choice) > budget {
        // Bisect lambda in log space between one that fits and one that does not.
        let (mut lo, mut hi) = (0.0f64, 1e-12f64);
        while bytes(&pick(hi)) > budget {
            lo = hi;
            hi *= 4.0;
            if hi > 1e30 {
                break;
            }
        }
        for _ in 0..100 {
            let mid = if lo == 0.0 {
                hi / 2.0
            } else {
                (lo * hi).sqrt()
            };
            if bytes(&pick(mid)) > budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        choice = pick(hi);
    }
    // Spend what is left on the upgrades that save the most loss per byte.
    let mut used = bytes(&choice);
    loop {
        let mut best: Option<(usize, f64)> = None;
        for (gi, g) in groups.iter().enumerate() {
            let i = choice[gi];
            if i + 1 >= g.options.len() {
                continue;
            }
            let (db, dl) = (
                g.options[i + 1].1 - g.options[i].1,
                g.options[i].2 - g.options[i + 1].2,
            );
            if used + db > budget {
                continue;
            }
            let rate = dl / db.max(1) as f64;
            if best.is_none_or(|(_, r)| rate > r) {
                best = Some((gi, rate));
            }
        }
        let Some((gi, _)) = best else { break };
        let i = choice[gi];
        used += groups[gi].options[i + 1].1 - groups[gi].options[i].1;
        choice[gi] = i + 1;
    }
    choice
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(Target::parse("120MiB"), Ok(Target::Bytes(120 << 20)));
        assert_eq!(Target::parse("1.5GB"), Ok(Target::Bytes(1_500_000_000)));
        assert_eq!(Target::parse("4096"), Ok(Target::Bytes(4096)));
        assert_eq!(Target::parse("3.5bpw"), Ok(Target::BitsPerWeight(3.5)));
        for bad in ["", "MiB", "12 parsecs", "0.1bpw", "0"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Target::BitsPerWeight(4.0).bytes(1000), 500);
    }

    fn unit(options: &[(u64, f64)]) -> Unit {
        Unit {
            layer: 0,
            slot: 0,
            matrix: 0,
            options: options
                .iter()
                .map(|&(b, d)| (GgmlType::Q4K, b, d))
                .collect(),
        }
    }

    #[test]
    fn hull_drops_options_never_worth_their_bytes() {
        let h = hull(vec![
            (GgmlType::Q2K, 10, 5.0),
            (GgmlType::Q3K, 12, 6.0),
            (GgmlType::Q4K, 14, 1.0),
        ]);
        assert_eq!(
            h.iter().map(|o| o.0).collect::<Vec<_>>(),
            [GgmlType::Q2K, GgmlType::Q4K]
        );
    }

    #[test]
    fn solve_spends_bytes_where_they_save_most() {
        // Two matrices: upgrading the first saves 9 for 10 bytes, the second 1 for 10 bytes.
        let groups = [
            unit(&[(10, 10.0), (20, 1.0)]),
            unit(&[(10, 2.0), (20, 1.0)]),
        ];
        assert_eq!(solve(&groups, 20), [0, 0]);
        assert_eq!(solve(&groups, 30), [1, 0]);
        assert_eq!(solve(&groups, 40), [1, 1]);
        // Exhaustive check on a small random-looking instance: no choice within the budget has
        // a lower loss than the solver's by more than one step's worth.
        let groups: Vec<Unit> = (0..5)
            .map(|i| {
                let s = 1.0 + i as f64;
                unit(&[(8, 8.0 * s), (12, 3.0 * s), (16, 1.0 * s), (24, 0.2 * s)])
            })
            .collect();
        for budget in [40u64, 60, 80, 100, 120] {
            let c = solve(&groups, budget);
            let bytes: u64 = groups.iter().zip(&c).map(|(g, &i)| g.options[i].1).sum();
            let loss: f64 = groups.iter().zip(&c).map(|(g, &i)| g.options[i].2).sum();
            assert!(bytes <= budget);
            let mut best = f64::INFINITY;
            for code in 0..4usize.pow(5) {
                let pick: Vec<usize> = (0..5).map(|k| code / 4usize.pow(k) % 4).collect();
                let b: u64 = groups.iter().zip(&pick).map(|(g, &i)| g.options[i].1).sum();
                if b <= budget {
                    let l: f64 = groups.iter().zip(&pick).map(|(g, &i)| g.options[i].2).sum();
                    best = best.min(l);
                }
            }
            assert!(
                loss <= best * 1.25 + 1e-9,
                "budget {budget}: {loss} vs optimum {best}"
            );
        }
    }

    #[test]
    fn more_bits_lose_less() {
        let rows: Vec<f32> = (0..256 * 8)
            .map(|i| (i as f32 * 0.37).sin() * (1.0 + (i % 7) as f32))
            .collect();
        let errs: Vec<f64> = [
            GgmlType::Q2K,
            GgmlType::Q3K,
            GgmlType::Q4K,
            GgmlType::Q6K,
            GgmlType::Q8_0,
        ]
        .iter()
        .map(|&t| relative_error(t, &rows, 256, None))
        .collect();
        assert!(errs.windows(2).all(|w| w[0] > w[1]), "{errs:?}");
        assert!(errs[0] < 0.2 && errs[4] < 1e-3, "{errs:?}");
    }
}
