//! Counters and gauges, rendered in Prometheus' text exposition format for `GET /metrics`.
//!
//! Expert figures: the runtime reports the routed-expert weight bytes each forward pass used
//! (`Session::expert_bytes_used`); an expert cache (hit rate) and the bytes it reads from flash
//! come with expert streaming. Until then the storage figures are the kernel's for the whole
//! process: bytes it read from storage (`/proc/self/io`) and the page faults that had to wait
//! for storage (major faults: a stall on a mapped weight page).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds (seconds) of the request duration histogram.
const LATENCY_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// Figures known once the model is loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub n_ctx: usize,
    pub file_bytes: u64,
    pub kv_bytes: usize,
    /// Recurrent layers' state of one sequence (fixed, whatever the context).
    pub recurrent_bytes: usize,
    pub load_seconds: f64,
}

#[derive(Default)]
struct F64(AtomicU64);

impl F64 {
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed)
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (endpoint, HTTP status) -> count.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    pub queue_depth: AtomicI64,
    pub queue_capacity: AtomicU64,
    pub generating: AtomicU64,
    pub connections: AtomicI64,
    pub queue_rejections: AtomicU64,
    pub cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    prompt_us: AtomicU64,
    generation_us: AtomicU64,
    last_prompt_tps: F64,
    last_generation_tps: F64,
    expert_bytes: AtomicU64,
    last_expert_bytes_per_token: F64,
    pub model: OnceLock<ModelInfo>,
    /// The expert cache when experts are streamed (--mem-budget).
    pub expert_cache: OnceLock<std::sync::Arc<moe_runtime::moe::cache::ExpertCache>>,
}

/// What one generation did, for the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationFigures {
    pub prompt_tokens: usize,
    /// Prompt ids taken from the prompt cache instead of evaluated.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_time: Duration,
    pub generation_time: Duration,
    /// Routed-expert bytes used by the whole request.
    pub expert_bytes: u64,
    /// Routed-expert bytes per decoded token (the prompt's batch excluded), if any was decoded.
    pub expert_bytes_per_token: Option<f64>,
}

impl Metrics {
    pub fn new(queue_capacity: u32) -> Self {
        let m = Self::default();
        m.queue_capacity.store(queue_capacity as u64, Relaxed);
        m
    }

    /// Counts one answered request and its duration.
    pub fn request(&self, endpoint: &'static str, status: u16, elapsed: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((endpoint, status))
            .or_default() += 1;
        let secs = elapsed.as_secs_f64();
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                n.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    pub fn generation(&self, g: &GenerationFigures) {
        let evaluated = g.prompt_tokens - g.cached_tokens;
        self.prompt_tokens.fetch_add(evaluated as u64, Relaxed);
        self.cached_prompt_tokens
            .fetch_add(g.cached_tokens as u64, Relaxed);
        self.generated_tokens
            .fetch_add(g.generated_tokens as u64, Relaxed);
        self.prompt_us
            .fetch_add(g.prompt_time.as_micros() as u64, Relaxed);
        self.generation_us
            .fetch_add(g.generation_time.as_micros() as u64, Relaxed);
        let rate = |n: usize, t: Duration| {
            if t.is_zero() {
                0.0
            } else {
                n as f64 / t.as_secs_f64()
            }
        };
        if evaluated > 0 && !g.prompt_time.is_zero() {
            self.last_prompt_tps.set(rate(evaluated, g.prompt_time));
        }
        if g.generated_tokens > 0 && !g.generation_time.is_zero() {
            self.last_generation_tps
                .set(rate(g.generated_tokens, g.generation_time));
        }
        self.expert_bytes.fetch_add(g.expert_bytes, Relaxed);
        if let Some(b) = g.expert_bytes_per_token {
            self.last_expert_bytes_per_token.set(b);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(o, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        let secs = |us: &AtomicU64| format!("{}", us.load(Relaxed) as f64 / 1e6);

        let requests: Vec<(String, String)> = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((ep, code), n)| {
                (
                    format!("{{endpoint=\"{ep}\",code=\"{code}\"}}"),
                    n.to_string(),
                )
            })
            .collect();
        metric(
            "moed_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status.",
            &requests,
        );
        let mut hist = Vec::new();
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            hist.push((
                format!("_bucket{{le=\"{bound}\"}}"),
                n.load(Relaxed).to_string(),
            ));
        }
        let count = self.latency_count.load(Relaxed).to_string();
        hist.push(("_bucket{le=\"+Inf\"}".into(), count.clone()));
        hist.push(("_sum".into(), secs(&self.latency_sum_us)));
        hist.push(("_count".into(), count));
        metric(
            "moed_request_duration_seconds",
            "histogram",
            "Time from request to the end of its response (streams included).",
            &hist,
        );
        metric(
            "moed_queue_rejections_total",
            "counter",
            "Requests refused with 503 because the queue was full.",
            &one(self.queue_rejections.load(Relaxed).to_string()),
        );
        metric(
            "moed_requests_cancelled_total",
            "counter",
            "Generations stopped because the client went away.",
            &one(self.cancelled.load(Relaxed).to_string()),
        );
        metric(
            "moed_queue_depth",
            "gauge",
            "Generation requests waiting for the model.",
            &one(self.queue_depth.load(Relaxed).max(0).to_string()),
        );
        metric(
            "moed_queue_capacity",
            "gauge",
            "Most requests that may wait (--max-queue).",
            &one(self.queue_capacity.load(Relaxed).to_string()),
        );
        metric(
            "moed_generating",
            "gauge",
            "1 while a generation runs.",
            &one(self.generating.load(Relaxed).to_string()),
        );
        metric(
            "moed_connections",
            "gauge",
            "Open client connections.",
            &one(self.connections.load(Relaxed).max(0).to_string()),
        );
        metric(
            "moed_prompt_tokens_total",
            "counter",
            "Prompt tokens evaluated.",
            &one(self.prompt_tokens.load(Relaxed).to_string()),
        );
        metric(
            "moed_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens taken from the prompt cache instead of evaluated.",
            &one(self.cached_prompt_tokens.load(Relaxed).to_string()),
        );
        metric(
            "moed_generated_tokens_total",
            "counter",
            "Tokens generated.",
            &one(self.generated_tokens.load(Relaxed).to_string()),
        );
        metric(
            "moed_prompt_seconds_total",
            "counter",
            "Time spent evaluating prompts.",
            &one(secs(&self.prompt_us)),
        );
        metric(
            "moed_generation_seconds_total",
            "counter",
            "Time spent generating tokens.",
            &one(secs(&self.generation_us)),
        );
        metric(
            "moed_prompt_tokens_per_second",
            "gauge",
            "Prompt evaluation speed of the last request.",
            &one(self.last_prompt_tps.get().to_string()),
        );
        metric(
            "moed_generation_tokens_per_second",
            "gauge",
            "Generation speed of the last request.",
            &one(self.last_generation_tps.get().to_string()),
        );
        metric("moed_expert_bytes_used_total", "counter", "Routed-expert weight bytes the forward passes used (each selected expert once per batch).", &one(self.expert_bytes.load(Relaxed).to_string()));
        metric(
            "moed_expert_bytes_per_token",
            "gauge",
            "Routed-expert weight bytes per generated token in the last request.",
            &one(self.last_expert_bytes_per_token.get().to_string()),
        );
        if let Some(c) = self.expert_cache.get() {
            let st = c.stats();
            metric(
                "moed_expert_cache_hit_rate",
                "gauge",
                "Share of routed experts found in the expert cache when needed.",
                &one(st.hit_rate().to_string()),
            );
            metric(
                "moed_expert_cache_slots",
                "gauge",
                "Experts the cache holds.",
                &one(st.slots.to_string()),
            );
            metric(
                "moed_flash_bytes_read_total",
                "counter",
                "Bytes of experts read from the model file into the cache.",
                &one(st.bytes_read.to_string()),
            );
            metric(
                "moed_expert_stall_seconds_total",
                "counter",
                "Time the forward pass waited for expert reads.",
                &one(st.stall_seconds.to_string()),
            );
            metric(
                "moed_expert_prefetch_precision",
                "gauge",
                "Share of speculative expert reads that were used.",
                &one(st.prefetch_precision().to_string()),
            );
            metric(
                "moed_expert_evictions_total",
                "counter",
                "Experts evicted from the cache.",
                &one(st.evictions.to_string()),
            );
            metric(
                "moed_expert_read_errors_total",
                "counter",
                "Expert reads that failed (each failed the request that needed the expert).",
                &one(st.read_errors.to_string()),
            );
        }
        if let Some(m) = self.model.get() {
            metric(
                "moed_model_info",
                "gauge",
                "The loaded model.",
                &[(
                    format!("{{model=\"{}\"}}", m.id.replace(['"', '\\', '\n'], "_")),
                    "1".into(),
                )],
            );
            metric(
                "moed_context_size",
                "gauge",
                "Positions the KV cache holds (--ctx).",
                &one(m.n_ctx.to_string()),
            );
            metric(
                "moed_model_file_bytes",
                "gauge",
                "Size of the memory-mapped model file.",
                &one(m.file_bytes.to_string()),
            );
            metric(
                "moed_kv_cache_bytes",
                "gauge",
                "Bytes allocated for the KV cache.",
                &one(m.kv_bytes.to_string()),
            );
            metric(
                "moed_recurrent_state_bytes",
                "gauge",
                "Bytes of recurrent layers' state (short convolutions, Gated DeltaNets, Mamba-2; with its snapshot) of one sequence.",
                &one(m.recurrent_bytes.to_string()),
            );
            metric(
                "moed_model_load_seconds",
                "gauge",
                "Time taken to load the model and warm up.",
                &one(m.load_seconds.to_string()),
            );
        }
        if let Some((live, peak)) = crate::alloc::heap_bytes() {
            metric(
                "moed_heap_bytes",
                "gauge",
                "Bytes allocated on the heap now (counted by moed's allocator; unlike RSS, not distorted by mapped model pages or an emulator's code cache).",
                &one(live.to_string()),
            );
            metric(
                "moed_heap_peak_bytes",
                "gauge",
                "The most bytes ever allocated on the heap at once.",
                &one(peak.to_string()),
            );
        }
        let p = ProcessStats::read();
        if let Some(v) = p.storage_read_bytes {
            metric("moed_process_storage_read_bytes_total", "counter", "Bytes this process caused to be read from storage (kernel /proc/self/io read_bytes; mapped model pages included).", &one(v.to_string()));
        }
        if let Some(v) = p.major_faults {
            metric("moed_process_major_page_faults_total", "counter", "Page faults that waited for storage: stalls on mapped weight pages not in the page cache.", &one(v.to_string()));
        }
        if let Some(v) = p.resident_bytes {
            metric(
                "process_resident_memory_bytes",
                "gauge",
                "Resident set size.",
                &one(v.to_string()),
            );
        }
        o
    }
}

/// Process-wide figures from /proc (absent where it cannot be read).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    pub storage_read_bytes: Option<u64>,
    pub major_faults: Option<u64>,
    pub resident_bytes: Option<u64>,
}

impl ProcessStats {
    pub fn read() -> Self {
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        };
        let io = std::fs::read_to_string("/proc/self/io").ok();
        let status = std::fs::read_to_string("/proc/self/status").ok();
        // /proc/self/stat: the fields after the parenthesised command; majflt is field 12.
        let majflt = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 2..];
                rest.split_whitespace().nth(9)?.parse().ok()
            });
        Self {
            storage_read_bytes: io.as_deref().and_then(|t| field(t, "read_bytes:")),
            major_faults: majflt,
            resident_bytes: status
                .as_deref()
                .and_then(|t| field(t, "VmRSS:"))
                .map(|kb| kb * 1024),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let m = Metrics::new(4);
        m.request("completions", 200, Duration::from_millis(30));
        m.request("completions", 503, Duration::from_millis(1));
        m.generation(&GenerationFigures {
            prompt_tokens: 5,
            cached_tokens: 0,
            generated_tokens: 10,
            prompt_time: Duration::from_millis(5),
            generation_time: Duration::from_millis(100),
            expert_bytes: 1000,
            expert_bytes_per_token: Some(90.0),
        });
        let text = m.render();
        assert!(text.contains("moed_requests_total{endpoint=\"completions\",code=\"200\"} 1\n"));
        assert!(text.contains("moed_requests_total{endpoint=\"completions\",code=\"503\"} 1\n"));
        assert!(text.contains("moed_request_duration_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("moed_request_duration_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("moed_request_duration_seconds_count 2\n"));
        assert!(text.contains("moed_generated_tokens_total 10\n"));
        assert!(text.contains("moed_generation_tokens_per_second 100\n"));
        assert!(text.contains("moed_queue_capacity 4\n"));
        // Every sample line is `name{labels} number`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        if cfg!(target_os = "linux") {
            assert!(ProcessStats::read().resident_bytes.unwrap() > 0);
        }
    }
}
