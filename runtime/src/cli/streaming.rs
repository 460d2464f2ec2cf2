//! Command-line options for expert streaming, shared by generation and benchmarks.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::board::Defaults;
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
            lookahead: self.lookahead(),
        })
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
