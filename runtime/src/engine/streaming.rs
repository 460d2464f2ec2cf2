//! Expert streaming as a session asks for it: the cache's size and policy, the predictor, and
//! how they are built for a model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::EngineError;
use crate::board::Defaults;
use crate::model::{ExpertStreaming, Ffn, Model, DEFAULT_MAX_BATCH};
use crate::moe::cache::flash::FlashProfile;
use crate::moe::cache::{
    plan_budget, CacheConfig, Eviction, ExpertCache, ExpertKey, RUNTIME_OVERHEAD,
};
use crate::moe::calib::CalibStats;
use crate::moe::lossy::RouteOptions;
use crate::moe::predictor::{ExpertPredictor, FrequencyPredictor};

/// How large the expert cache is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheSize {
    /// A total memory budget: non-expert weights and the KV cache stay resident, routed experts
    /// fill the rest.
    Budget(u64),
    /// The cache alone, in bytes.
    Bytes(u64),
    /// The cache alone, as a share of all routed experts' bytes as stored (slots are
    /// page-aligned, so holding every expert of a model with small ones takes more than 1).
    Share(f64),
}

impl CacheSize {
    /// `50%` (a share of all experts) or a size such as `512M`.
    pub fn parse_cache(s: &str) -> Result<Self, String> {
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(v) if v > 0.0 && v.is_finite() => Ok(Self::Share(v / 100.0)),
                _ => Err(format!("`{s}` is not a positive percentage such as 50%")),
            },
            None => crate::units::parse_size(s)
                .map(Self::Bytes)
                .map_err(|e| format!("{e}, or a percentage such as 50%")),
        }
    }
}

/// The token-level expert predictor run before the backbone.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum PredictorChoice {
    #[default]
    None,
    /// Each layer's most used experts so far.
    Frequency,
    /// The model's pre-gating router network: this ONNX file, or the one the GGUF names or that
    /// lies beside it.
    Pregate(Option<PathBuf>),
}

/// What the session's expert streaming should be; unset fields take the board profile's
/// defaults, then the runtime's.
#[derive(Clone, Debug, Default)]
pub struct StreamingOptions {
    /// None: everything resident, unless the board's memory cannot hold the model.
    pub size: Option<CacheSize>,
    pub eviction: Option<Eviction>,
    /// Predict the experts of this many following layers and prefetch them (0 = off).
    pub lookahead: Option<usize>,
    /// Do not read a layer's experts as soon as its router has run (when the router reads the
    /// layer's input, SmallThinker); they are then read when its feed-forward asks.
    pub no_router_prefetch: bool,
    /// Read experts with O_DIRECT (bypassing the page cache).
    pub direct_io: bool,
    /// Emulate a storage device's speed (measurement only).
    pub flash: Option<FlashProfile>,
    pub io_threads: Option<usize>,
    pub predictor: PredictorChoice,
    /// Experts the predictor guesses per layer and token (default: the model's top-k).
    pub predict_k: Option<usize>,
    /// Share of the cache's slots kept for the experts the calibration statistics used most.
    pub pin_hot: f64,
    /// Do not start the cache's use-frequency estimates from calibration statistics.
    pub no_calib_prior: bool,
    /// Lossy routing options (off by default).
    pub route: RouteOptions,
    /// Benchmarks: route by this routing trace (`PREFIX` of `PREFIX.experts.npy`) instead of
    /// the model's router.
    pub route_replay: Option<PathBuf>,
}

impl StreamingOptions {
    /// The streaming setup for `model` at `path` (resident when no size is given and the model
    /// fits in the board's memory).
    pub fn build(
        &self,
        model: &Model,
        path: &Path,
        kv_bytes: usize,
        board: Option<&Defaults>,
    ) -> Result<ExpertStreaming, EngineError> {
        let size = match (self.size, board) {
            (Some(size), _) => size,
            (None, Some(b)) if !fits(model, kv_bytes, b.mem_budget) => {
                CacheSize::Budget(b.mem_budget as u64)
            }
            (None, _) => {
                if self.flash.is_some()
                    || self.direct_io
                    || self.pin_hot > 0.0
                    || self.route.skip_uncached_below.is_some()
                {
                    return Err(EngineError::Options(
                        "--flash-profile, --direct-io, --pin-hot and --skip-uncached-below apply \
                         to streamed experts: add --mem-budget or --expert-cache"
                            .into(),
                    ));
                }
                return Ok(ExpertStreaming::default());
            }
        };
        let layout = model.expert_layout();
        let slot_bytes = layout.slot_bytes();
        let per_token = model.hp.n_expert_used;
        let slots = match size {
            CacheSize::Budget(budget) => {
                // The scratch of a prompt batch is resident too (sessions run prompts in
                // batches of at most DEFAULT_MAX_BATCH rows).
                let resident = kv_bytes + model.batch_scratch_bytes(DEFAULT_MAX_BATCH);
                plan_budget(model.file, &layout, per_token, resident, budget as usize)?.slots
            }
            CacheSize::Bytes(b) => (b as usize / slot_bytes).max(model.hp.n_expert_used),
            CacheSize::Share(share) => {
                let bytes = layout.total_expert_bytes() as f64 * share;
                (bytes as usize / slot_bytes).max(model.hp.n_expert_used)
            }
        };
        // Speculative reads in flight: two experts' worth, so a demand read never queues behind
        // more than that on the device (on weak flash, guesses must not delay certainties).
        let largest_expert = (0..model.hp.n_layer)
            .map(|l| layout.max_expert_bytes(l))
            .max()
            .unwrap_or(0);
        let cfg = CacheConfig {
            slots,
            eviction: self
                .eviction
                .or(board.map(|b| b.eviction))
                .unwrap_or(Eviction::Belady),
            direct_io: self.direct_io || board.is_some_and(|b| b.direct_io),
            flash: self.flash,
            io_threads: self
                .io_threads
                .or(board.map(|b| b.io_threads))
                .unwrap_or(2)
                .max(1),
            max_speculative_bytes: 2 * largest_expert,
        };
        crate::moe::cache::advise_resident_only(model.file, &layout);
        let cache = ExpertCache::new(layout, per_token, path, cfg)?;
        self.apply_calibration(model, &cache)?;
        Ok(ExpertStreaming {
            cache: Some(Arc::new(cache)),
            lookahead: self.lookahead.or(board.map(|b| b.lookahead)).unwrap_or(0),
        })
    }

    /// Seeds the cache's frequency estimates and keeps hot experts resident from the file's
    /// calibration statistics, when it has them.
    fn apply_calibration(&self, model: &Model, cache: &ExpertCache) -> Result<(), EngineError> {
        let hp = &model.hp;
        let Some(stats) = CalibStats::from_header(model.file.header(), hp.n_layer, hp.n_expert)?
        else {
            if self.pin_hot > 0.0 {
                return Err(EngineError::Options(
                    "--pin-hot needs calibration statistics in the model file; convert it with \
                     moe-convert --calib TEXT"
                        .into(),
                ));
            }
            return Ok(());
        };
        if !self.no_calib_prior {
            cache.seed_frequency(&stats.frequency);
        }
        if self.pin_hot > 0.0 {
            let mut keys: Vec<(f32, ExpertKey)> = (0..hp.n_layer)
                .flat_map(|l| (0..hp.n_expert).map(move |e| (l, e)))
                .map(|(l, e)| {
                    let key = ExpertKey {
                        layer: l as u32,
                        expert: e as u32,
                    };
                    (stats.frequency[stats.idx(l, e)], key)
                })
                .collect();
            keys.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want = (cache.slots() as f64 * self.pin_hot.min(1.0)) as usize;
            let keys: Vec<ExpertKey> = keys.into_iter().take(want).map(|(_, k)| k).collect();
            // Two tokens' worth of experts stay evictable so demand reads always find a slot.
            cache.keep_resident(&keys, 2 * hp.n_expert_used);
        }
        Ok(())
    }

    /// The token-level predictor these options ask for.
    pub fn predictor(
        &self,
        model: &Model,
        path: &Path,
    ) -> Result<Option<Box<dyn ExpertPredictor>>, EngineError> {
        let hp = &model.hp;
        match &self.predictor {
            PredictorChoice::None => Ok(None),
            PredictorChoice::Frequency => {
                let k = self.predict_k.unwrap_or(hp.n_expert_used);
                let moe = model
                    .layers
                    .iter()
                    .map(|l| matches!(l.ffn, Ffn::Moe(_)))
                    .collect();
                Ok(Some(Box::new(FrequencyPredictor::new(moe, hp.n_expert, k))))
            }
            PredictorChoice::Pregate(file) => {
                let onnx = match file {
                    Some(p) => p.clone(),
                    None => crate::moe::predictor::find_sidecar(path, model.file.header())
                        .ok_or_else(|| {
                            EngineError::Options(format!(
                                "{} names no pre-gating router and has no {}.pregate.onnx beside \
                                 it; pass --pregate FILE",
                                path.display(),
                                path.file_stem().unwrap_or_default().to_string_lossy()
                            ))
                        })?,
                };
                pregate(&onnx, model, self.predict_k)
            }
        }
    }
}

/// Whether the whole model (file, KV cache and runtime overhead) fits in `budget` bytes.
fn fits(model: &Model, kv_bytes: usize, budget: usize) -> bool {
    let scratch = model.batch_scratch_bytes(DEFAULT_MAX_BATCH);
    model.file.bytes().len() + kv_bytes + scratch + RUNTIME_OVERHEAD <= budget
}

/// The pre-gating router at `onnx`: natively when it is the GRU of `scripts/train/train_pregate.py`,
/// else (with the `pregate` feature) with tract-onnx.
fn pregate(
    onnx: &Path,
    model: &Model,
    k: Option<usize>,
) -> Result<Option<Box<dyn ExpertPredictor>>, EngineError> {
    use crate::moe::predictor::GruPredictor;
    let (n_layer, n_expert) = (model.hp.n_layer, model.hp.n_expert);
    match GruPredictor::load(onnx, n_layer, n_expert, k) {
        Ok(p) => Ok(Some(Box::new(p))),
        #[cfg(feature = "pregate")]
        Err(crate::moe::predictor::PredictorError::Foreign { .. }) => {
            let p = crate::moe::predictor::PregatePredictor::load(onnx, n_layer, n_expert, k)?;
            Ok(Some(Box::new(p)))
        }
        // Without tract, the error says to rebuild with `--features pregate`.
        Err(e) => Err(e.into()),
    }
}

/// The expert-cache part of the start-up line, e.g. `expert cache: 96 slots, 24.0 MiB (50% of
/// experts), belady, O_DIRECT, 1 I/O thread` or `expert cache: off (all experts resident)`.
pub fn describe(cache: Option<&ExpertCache>, lookahead: usize) -> String {
    let Some(c) = cache else {
        return "expert cache: off (all experts resident)".into();
    };
    let cfg = c.config();
    let total = c.layout().total_expert_bytes().max(1);
    let bytes = c.memory_bytes();
    format!(
        "expert cache: {} slots, {} ({:.0}% of experts), {}{}, {} I/O thread{}, lookahead {}",
        c.slots(),
        crate::board::human_bytes(bytes as u64),
        100.0 * bytes as f64 / total as f64,
        format!("{:?}", cfg.eviction).to_lowercase(),
        if cfg.direct_io { ", O_DIRECT" } else { "" },
        cfg.io_threads,
        if cfg.io_threads == 1 { "" } else { "s" },
        lookahead
    )
}
