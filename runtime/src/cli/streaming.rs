//! Command-line options for expert streaming, shared by generation and benchmarks.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::model::{ExpertStreaming, Model};
use crate::moe::cache::{
    parse_size, plan_budget, CacheConfig, Eviction, ExpertCache, ExpertLayout,
};
use crate::moe::flash::FlashProfile;

#[derive(clap::Args, Debug, Clone)]
pub struct StreamingArgs {
    /// Total memory budget (e.g. 3G, 512M): non-expert weights and the KV cache stay resident,
    /// routed experts are streamed from the file through a cache filling the rest
    #[arg(long, value_parser = parse_size_arg)]
    pub mem_budget: Option<usize>,
    /// Size the expert cache directly, as a share of all expert bytes (e.g. 50%) or a size
    #[arg(long, conflicts_with = "mem_budget")]
    pub expert_cache: Option<String>,
    /// Eviction policy of the expert cache: lru, lfu or belady
    #[arg(long, default_value = "belady", value_parser = parse_eviction)]
    pub eviction: Eviction,
    /// Predict the experts of this many following layers and prefetch them (0 = off, the
    /// default: on the trained benchmark model, speculative reads cost more than they hid)
    #[arg(long, default_value_t = 0)]
    pub lookahead: usize,
    /// Read experts with O_DIRECT (bypass the page cache)
    #[arg(long)]
    pub direct_io: bool,
    /// Emulate a storage device's speed for expert reads: microsd, usb-ssd or nvme
    #[arg(long, value_parser = parse_flash)]
    pub flash_profile: Option<FlashProfile>,
    /// Threads reading experts
    #[arg(long, default_value_t = 2)]
    pub io_threads: usize,
}

fn parse_size_arg(s: &str) -> Result<usize, String> {
    parse_size(s).ok_or_else(|| format!("`{s}` is not a size like 512M or 3G"))
}

fn parse_eviction(s: &str) -> Result<Eviction, String> {
    Eviction::from_name(s).ok_or_else(|| format!("`{s}` is not lru, lfu or belady"))
}

fn parse_flash(s: &str) -> Result<FlashProfile, String> {
    FlashProfile::by_name(s).ok_or_else(|| format!("`{s}` is not microsd, usb-ssd or nvme"))
}

impl StreamingArgs {
    pub fn enabled(&self) -> bool {
        self.mem_budget.is_some() || self.expert_cache.is_some()
    }

    /// The streaming setup these options ask for (resident when neither budget is given).
    pub fn build(&self, model: &Model, path: &Path, kv_bytes: usize) -> Result<ExpertStreaming> {
        if !self.enabled() {
            if self.flash_profile.is_some() || self.direct_io {
                bail!("--flash-profile and --direct-io apply to streamed experts: add --mem-budget or --expert-cache");
            }
            return Ok(ExpertStreaming::default());
        }
        let layout = ExpertLayout::from_model(model);
        let slot_bytes = layout.slot_bytes();
        let slots = match (&self.mem_budget, &self.expert_cache) {
            (Some(budget), _) => plan_budget(model, slot_bytes, kv_bytes, *budget)?.slots,
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
            .map(|l| layout.expert_bytes(l))
            .max()
            .unwrap_or(0);
        let mut cfg = self.config(slots);
        cfg.max_speculative_bytes = 2 * expert;
        let cache = ExpertCache::new(model, path, cfg)?;
        Ok(ExpertStreaming {
            cache: Some(Arc::new(cache)),
            lookahead: self.lookahead,
        })
    }

    fn config(&self, slots: usize) -> CacheConfig {
        CacheConfig {
            slots,
            eviction: self.eviction,
            direct_io: self.direct_io,
            flash: self.flash_profile,
            io_threads: self.io_threads,
            // Speculative reads in flight: a few experts' worth, so a demand read never waits
            // behind a long queue of guesses.
            max_speculative_bytes: 32 << 20,
        }
    }
}
