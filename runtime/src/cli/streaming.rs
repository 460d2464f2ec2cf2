//! Command-line options for expert streaming, shared by generation and benchmarks.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::board::Defaults;
use crate::model::{ExpertStreaming, Model};
use crate::moe::cache::flash::FlashProfile;
use crate::moe::cache::{parse_size, plan_budget, CacheConfig, Eviction, ExpertCache, ExpertKey};
use crate::moe::calib::CalibStats;
use crate::moe::lossy::RouteOptions;
use crate::moe::predictor::{ExpertPredictor, FrequencyPredictor};

#[derive(clap::Args, Debug, Clone)]
pub struct StreamingArgs {
    /// Total memory budget (e.g. 3G, 512M): non-expert weights and the KV cache stay resident,
    /// routed experts are streamed from the file through a cache filling the rest
    #[arg(long, value_parser = parse_size_arg)]
    pub mem_budget: Option<usize>,
    /// Size the expert cache directly, as a share of all expert bytes (e.g. 50%) or a size
    #[arg(long, conflicts_with = "mem_budget")]
    pub expert_cache: Option<String>,
    /// Eviction policy of the expert cache: lru, lfu or belady [default: belady]
    #[arg(long, value_parser = parse_eviction)]
    pub eviction: Option<Eviction>,
    /// Predict the experts of this many following layers and prefetch them (0 = off, the
    /// default: on the trained benchmark model, speculative reads cost more than they hid)
    #[arg(long)]
    pub lookahead: Option<usize>,
    /// Read experts with O_DIRECT (bypass the page cache; a board profile turns it on)
    #[arg(long)]
    pub direct_io: bool,
    /// Emulate a storage device's speed for expert reads: microsd, microsd-pi4, usb-ssd or nvme
    #[arg(long, value_parser = parse_flash)]
    pub flash_profile: Option<FlashProfile>,
    /// Threads reading experts [default: 2, or the board profile's]
    #[arg(long)]
    pub io_threads: Option<usize>,
    /// Defaults from a board profile (`--target-profile`), used for what the flags leave unset.
    /// Its memory budget applies only when the model does not fit in it.
    #[arg(skip)]
    pub board: Option<Defaults>,
    /// Token-level expert predictor, run before the backbone: none, frequency (each layer's most
    /// used experts so far) or pregate (the model's pre-gating router network: its GRU runs
    /// natively, other ONNX networks need the `pregate` build feature); combines with --lookahead
    #[arg(long, default_value = "none", value_parser = ["none", "frequency", "pregate"])]
    pub predictor: String,
    /// The pre-gating router (ONNX); default: the GGUF's `moe_edge.pregate.onnx` key, else
    /// MODEL_STEM.pregate.onnx beside the model
    #[arg(long)]
    pub pregate: Option<std::path::PathBuf>,
    /// Experts the predictor guesses per layer and token (default: the model's top-k)
    #[arg(long)]
    pub predict_k: Option<usize>,
    /// Pin this fraction of the cache's slots to the experts used most in the calibration
    /// statistics stored in the file (moe-convert --calib); 0 = off
    #[arg(long, default_value_t = 0.0)]
    pub pin_hot: f64,
    /// Do not start the cache's use-frequency estimates from the file's calibration statistics
    #[arg(long)]
    pub no_calib_prior: bool,
    /// Lossy: route each token to the fewest of its top-k experts whose share of the router
    /// weight reaches P (off by default)
    #[arg(long, value_parser = parse_fraction)]
    pub route_top_p: Option<f32>,
    /// Lossy: skip a routed expert that is not in the expert cache when its share of the
    /// token's router weight is below W (never the best expert; off by default)
    #[arg(long, value_parser = parse_fraction)]
    pub skip_uncached_below: Option<f32>,
}

fn parse_fraction(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number between 0 and 1")),
    }
}

fn parse_size_arg(s: &str) -> Result<usize, String> {
    parse_size(s).ok_or_else(|| format!("`{s}` is not a size like 512M or 3G"))
}

fn parse_eviction(s: &str) -> Result<Eviction, String> {
    Eviction::from_name(s).ok_or_else(|| format!("`{s}` is not lru, lfu or belady"))
}

fn parse_flash(s: &str) -> Result<FlashProfile, String> {
    FlashProfile::by_name(s)
        .ok_or_else(|| format!("`{s}` is not microsd, microsd-pi4, usb-ssd or nvme"))
}

impl StreamingArgs {
    pub fn enabled(&self) -> bool {
        self.mem_budget.is_some() || self.expert_cache.is_some()
    }

    /// The lossy routing options asked for (all off by default).
    pub fn route_options(&self) -> RouteOptions {
        RouteOptions {
            top_p: self.route_top_p,
            skip_uncached_below: self.skip_uncached_below,
        }
    }

    /// The budget to stream under when no flag asked for one: the board's, if the whole model
    /// (file, KV cache and runtime overhead) does not fit in it.
    fn board_budget(&self, model: &Model, kv_bytes: usize) -> Option<usize> {
        let budget = self.board.as_ref()?.mem_budget;
        let need = model.file.bytes().len() + kv_bytes + crate::moe::cache::RUNTIME_OVERHEAD;
        (need > budget).then_some(budget)
    }

    /// The streaming setup these options ask for (resident when neither budget is given and
    /// the model fits in the board's).
    pub fn build(&self, model: &Model, path: &Path, kv_bytes: usize) -> Result<ExpertStreaming> {
        if !self.enabled() {
            if let Some(budget) = self.board_budget(model, kv_bytes) {
                let with_budget = StreamingArgs {
                    mem_budget: Some(budget),
                    ..self.clone()
                };
                return with_budget.build(model, path, kv_bytes);
            }
            if self.flash_profile.is_some()
                || self.direct_io
                || self.pin_hot > 0.0
                || self.skip_uncached_below.is_some()
            {
                bail!("--flash-profile, --direct-io, --pin-hot and --skip-uncached-below apply to streamed experts: add --mem-budget or --expert-cache");
            }
            return Ok(ExpertStreaming::default());
        }
        let layout = model.expert_layout();
        let slot_bytes = layout.slot_bytes();
        let slots = match (&self.mem_budget, &self.expert_cache) {
            (Some(budget), _) => {
                plan_budget(
                    model.file,
                    &layout,
                    model.hp.n_expert_used,
                    kv_bytes,
                    *budget,
                )?
                .slots
            }
            (None, Some(spec)) => {
                let total = layout.total_expert_bytes();
                let bytes = match spec.strip_suffix('%') {
                    Some(p) => {
                        let pct: f64 = p
                            .trim()
                            .parse()
                            .map_err(|_| anyhow::anyhow!("bad percentage `{spec}`"))?;
                        (total as f64 * pct / 100.0) as usize
                    }
                    None => parse_size(spec)
                        .ok_or_else(|| anyhow::anyhow!("`{spec}` is not a size or percentage"))?,
                };
                (bytes / slot_bytes).max(model.hp.n_expert_used)
            }
            (None, None) => unreachable!("enabled() checked"),
        };
        // Speculative reads in flight: two experts' worth, so a demand read never queues behind
        // more than that on the device (on weak flash, guesses must not delay certainties).
        let expert = (0..model.hp.n_layer)
            .map(|l| layout.max_expert_bytes(l))
            .max()
            .unwrap_or(0);
        let mut cfg = self.config(slots);
        cfg.max_speculative_bytes = 2 * expert;
        let cache = ExpertCache::new(layout, model.hp.n_expert_used, path, cfg)?;
        crate::moe::cache::advise_resident_only(model.file, cache.layout());
        self.apply_calibration(model, &cache)?;
        Ok(ExpertStreaming {
            cache: Some(Arc::new(cache)),
            lookahead: self.lookahead(),
        })
    }

    /// Seeds the cache's frequency estimates and pins hot experts from the file's calibration
    /// statistics, when it has them.
    fn apply_calibration(&self, model: &Model, cache: &ExpertCache) -> Result<()> {
        let hp = &model.hp;
        let Some(stats) = CalibStats::from_header(model.file.header(), hp.n_layer, hp.n_expert)?
        else {
            if self.pin_hot > 0.0 {
                bail!("--pin-hot needs calibration statistics in the model file; convert it with moe-convert --calib TEXT");
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
    ) -> Result<Option<Box<dyn ExpertPredictor>>> {
        let hp = &model.hp;
        let k = self.predict_k.unwrap_or(hp.n_expert_used);
        match self.predictor.as_str() {
            "frequency" => {
                let moe = model
                    .layers
                    .iter()
                    .map(|l| matches!(l.ffn, crate::model::Ffn::Moe(_)))
                    .collect();
                Ok(Some(Box::new(FrequencyPredictor::new(moe, hp.n_expert, k))))
            }
            "pregate" => {
                let onnx = match &self.pregate {
                    Some(p) => p.clone(),
                    None => crate::moe::predictor::find_sidecar(path, model.file.header())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "{} names no pre-gating router and has no {}.pregate.onnx beside it; pass --pregate FILE",
                                path.display(),
                                path.file_stem().unwrap_or_default().to_string_lossy()
                            )
                        })?,
                };
                pregate(&onnx, model, self.predict_k)
            }
            _ => Ok(None),
        }
    }

    fn lookahead(&self) -> usize {
        self.lookahead
            .or(self.board.as_ref().map(|b| b.lookahead))
            .unwrap_or(0)
    }

    fn config(&self, slots: usize) -> CacheConfig {
        let board = self.board.as_ref();
        CacheConfig {
            slots,
            eviction: self
                .eviction
                .or(board.map(|b| b.eviction))
                .unwrap_or(Eviction::Belady),
            direct_io: self.direct_io || board.is_some_and(|b| b.direct_io),
            flash: self.flash_profile,
            io_threads: self
                .io_threads
                .or(board.map(|b| b.io_threads))
                .unwrap_or(2)
                .max(1),
            // Speculative reads in flight: a few experts' worth, so a demand read never waits
            // behind a long queue of guesses.
            max_speculative_bytes: 32 << 20,
        }
    }
}

/// The pre-gating router at `onnx`: natively when it is the GRU of `scripts/train_pregate.py`,
/// else (with the `pregate` feature) with tract-onnx.
fn pregate(
    onnx: &Path,
    model: &Model,
    k: Option<usize>,
) -> Result<Option<Box<dyn ExpertPredictor>>> {
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
pub fn describe(streaming: &ExpertStreaming) -> String {
    let Some(c) = &streaming.cache else {
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
        streaming.lookahead
    )
}
