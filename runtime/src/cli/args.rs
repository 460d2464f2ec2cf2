//! Command-line flags shared by `moe-run`'s commands and by `moed` (which flattens them), mapped
//! onto the runtime's [`StreamingOptions`].

use std::path::PathBuf;

use crate::engine::{CacheSize, PredictorChoice, StreamingOptions};
use crate::model::KvType;
use crate::moe::cache::flash::FlashProfile;
use crate::moe::cache::Eviction;
use crate::moe::lossy::RouteOptions;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct StreamingArgs {
    /// Total memory budget (e.g. 3G, 512M): non-expert weights and the KV cache stay resident,
    /// routed experts are streamed from the file through a cache filling the rest
    #[arg(long, value_parser = parse_budget)]
    pub mem_budget: Option<CacheSize>,
    /// Size the expert cache directly, as a share of all expert bytes (e.g. 50%) or a size
    #[arg(long, conflicts_with = "mem_budget", value_parser = CacheSize::parse_cache)]
    pub expert_cache: Option<CacheSize>,
    /// Eviction policy of the expert cache: lru, lfu or belady [default: belady]
    #[arg(long, value_parser = parse_eviction)]
    pub eviction: Option<Eviction>,
    /// Predict the experts of this many following layers and prefetch them [default: 0 (off),
    /// or the board profile's]
    #[arg(long)]
    pub lookahead: Option<usize>,
    /// Do not read a layer's experts as soon as its router has run (models whose router reads
    /// the layer's input before attention, SmallThinker): wait for its feed-forward instead
    #[arg(long)]
    pub no_router_prefetch: bool,
    /// Read experts with O_DIRECT (bypass the page cache; a board profile turns it on)
    #[arg(long)]
    pub direct_io: bool,
    /// Emulate a storage device's speed for expert reads: microsd, microsd-pi4, usb-ssd or nvme,
    /// optionally with injected faults (`usb-ssd,fail-every=50,slow-every=7,slow-ms=20`)
    #[arg(long, value_parser = parse_flash)]
    pub flash_profile: Option<FlashProfile>,
    /// Threads reading experts [default: 2, or the board profile's]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub io_threads: Option<u16>,
    /// Token-level expert predictor, run before the backbone: none, frequency (each layer's most
    /// used experts so far) or pregate (the model's pre-gating router network: its GRU runs
    /// natively, other ONNX networks need the `pregate` build feature); combines with
    /// --lookahead. Only moves reads earlier: the output is the same with any predictor
    #[arg(long, default_value = "none", value_parser = ["none", "frequency", "pregate"])]
    pub predictor: String,
    /// The pre-gating router (ONNX); default: the GGUF's `moe_edge.pregate.onnx` key, else
    /// MODEL_STEM.pregate.onnx beside the model
    #[arg(long)]
    pub pregate: Option<PathBuf>,
    /// Experts the predictor guesses per layer and token (default: the model's top-k)
    #[arg(long)]
    pub predict_k: Option<usize>,
    /// Pin this fraction of the cache's slots to the experts used most in the calibration
    /// statistics stored in the file (moe-convert --calib); 0 = off
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction_f64)]
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
    /// Benchmarks only: each token's experts come from this routing trace (PREFIX of
    /// PREFIX.experts.npy, from `moe-run trace` or scripts/bench/synth_routing_trace.py)
    /// instead of the model's router, so that a random-weight file streams like a trained
    /// model. The output is then not the model's
    #[arg(long, value_name = "PREFIX")]
    pub route_replay: Option<PathBuf>,
}

impl StreamingArgs {
    pub fn options(&self) -> StreamingOptions {
        StreamingOptions {
            size: self.mem_budget.or(self.expert_cache),
            eviction: self.eviction,
            lookahead: self.lookahead,
            no_router_prefetch: self.no_router_prefetch,
            direct_io: self.direct_io,
            flash: self.flash_profile,
            io_threads: self.io_threads.map(usize::from),
            predictor: match self.predictor.as_str() {
                "frequency" => PredictorChoice::Frequency,
                "pregate" => PredictorChoice::Pregate(self.pregate.clone()),
                _ => PredictorChoice::None,
            },
            predict_k: self.predict_k,
            pin_hot: self.pin_hot,
            no_calib_prior: self.no_calib_prior,
            route: RouteOptions {
                top_p: self.route_top_p,
                skip_uncached_below: self.skip_uncached_below,
            },
            route_replay: self.route_replay.clone(),
        }
    }
}

fn parse_budget(s: &str) -> Result<CacheSize, String> {
    crate::units::parse_size(s)
        .map(CacheSize::Budget)
        .map_err(|e| e.to_string())
}

fn parse_fraction(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number between 0 and 1")),
    }
}

fn parse_fraction_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number between 0 and 1")),
    }
}

fn parse_eviction(s: &str) -> Result<Eviction, String> {
    Eviction::from_name(s).ok_or_else(|| format!("`{s}` is not lru, lfu or belady"))
}

fn parse_flash(s: &str) -> Result<FlashProfile, String> {
    FlashProfile::parse(s)
}

pub fn parse_kv_type(s: &str) -> Result<KvType, String> {
    KvType::from_name(s).ok_or_else(|| format!("`{s}` is not f16 or f32"))
}
