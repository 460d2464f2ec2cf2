//! Command-line flags. Every flag can also come from a `MOED_*` environment variable, so a
//! systemd `EnvironmentFile=` (see `targets/moed.env`) serves as the configuration file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use moe_runtime::model::KvType;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "moed",
    version,
    about = "Keep a Mixture-of-Experts GGUF model warm and serve an OpenAI-compatible HTTP API \
             on a UNIX socket",
    after_help = "Every option can also be set through the environment variable shown, e.g. in a \
                  systemd EnvironmentFile (targets/moed.env)."
)]
pub struct Config {
    /// Model file (GGUF, as written by moe-convert)
    #[arg(short = 'm', long, env = "MOED_MODEL")]
    pub model: PathBuf,
    /// Path of the UNIX socket to serve on; its directory must belong to the daemon's user
    #[arg(long, env = "MOED_SOCKET", default_value = "/run/moed/moed.sock")]
    pub socket: PathBuf,
    /// Permission bits of the socket file, in octal
    #[arg(long, env = "MOED_SOCKET_MODE", default_value = "660", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group (name or numeric id) given to the socket file and a directory the daemon creates
    #[arg(long, env = "MOED_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Total memory budget (e.g. 3G, 512M): non-expert weights and the KV cache stay resident,
    /// routed experts stream from the model file through a cache filling the rest
    #[arg(long, env = "MOED_MEM_BUDGET")]
    pub mem_budget: Option<String>,
    /// Read streamed experts with O_DIRECT (bypass the page cache)
    #[arg(long, env = "MOED_DIRECT_IO")]
    pub direct_io: bool,
    /// Layers ahead whose experts are predicted and prefetched when streaming [default: 0, or
    /// the board profile's]
    #[arg(long, env = "MOED_LOOKAHEAD")]
    pub lookahead: Option<usize>,
    /// Token-level expert predictor run before the backbone when streaming: none, frequency
    /// (each layer's most used experts so far) or pregate (the model's pre-gating router
    /// network: its GRU runs natively, other ONNX networks need moed built with `--features
    /// pregate`). Only moves reads earlier: the
    /// output is the same with any predictor
    #[arg(long, env = "MOED_PREDICTOR", default_value = "none", value_parser = ["none", "frequency", "pregate"])]
    pub predictor: String,
    /// The pre-gating router (ONNX); default: the GGUF's `moe_edge.pregate.onnx` key, else
    /// MODEL_STEM.pregate.onnx beside the model
    #[arg(long, env = "MOED_PREGATE")]
    pub pregate: Option<PathBuf>,
    /// Threads reading streamed experts [default: the board profile's, else 2]
    #[arg(long, env = "MOED_IO_THREADS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub io_threads: Option<u32>,
    /// Board profile giving the defaults of threads, memory budget and expert streaming: auto
    /// (detect the CPU and RAM), none, pi5, pi4, zero2w, generic-aarch64, x86_64 or a .toml
    /// file; NAME:STORAGE names the model's device (e.g. pi4:usb-ssd). Flags still win
    #[arg(long, env = "MOED_TARGET_PROFILE", default_value = "auto")]
    pub target_profile: String,
    /// Worker threads for the forward pass (default: all cores)
    #[arg(short = 't', long, env = "MOED_THREADS")]
    pub threads: Option<usize>,
    /// Context length: the KV cache holds this many positions (default: the smaller of the
    /// model's training context and 4096)
    #[arg(short = 'c', long, env = "MOED_CTX")]
    pub ctx: Option<usize>,
    /// Requests that may wait while one generates; more get 503 with Retry-After
    #[arg(long, env = "MOED_MAX_QUEUE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_queue: u32,
    /// Open client connections at most; more get 503 and are closed
    #[arg(long, env = "MOED_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Largest request body accepted (bytes, or with a K/M suffix)
    #[arg(long, env = "MOED_MAX_BODY", default_value = "1M", value_parser = parse_size)]
    pub max_body: u64,
    /// Seconds a client has to send a request's headers (and body) before it gets 408
    #[arg(long, env = "MOED_HEADER_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub header_timeout: Duration,
    /// On SIGTERM/SIGINT, seconds a running generation may go on before it is cut
    #[arg(long, env = "MOED_SHUTDOWN_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub shutdown_timeout: Duration,
    /// Model id reported by /v1/models and expected in requests (default: the file name
    /// without .gguf)
    #[arg(long, env = "MOED_ALIAS")]
    pub alias: Option<String>,
    /// KV cache type: f16 (half the memory) or f32 [default: f16, or the board profile's]
    #[arg(long, env = "MOED_KV_TYPE", value_parser = parse_kv_type)]
    pub kv_type: Option<KvType>,
    /// Skip the warm-up forward pass after loading
    #[arg(long, env = "MOED_NO_WARMUP")]
    pub no_warmup: bool,
    /// Test hook: sleep this many milliseconds after every generated token
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_token_delay_ms: u64,
    /// Test hook: sleep this many milliseconds before loading the model
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_load_delay_ms: u64,
    /// Defaults from `--target-profile`, resolved at start (see [`Config::apply_board`]).
    #[arg(skip)]
    pub board: Option<moe_runtime::board::Defaults>,
    /// The start-up line's CPU/RAM/profile part, logged once the expert cache is set up.
    #[arg(skip)]
    pub startup: String,
}

impl Config {
    /// Checks what clap cannot: flags that are accepted but not implemented yet.
    pub fn validate(&self) -> Result<()> {
        if let Some(budget) = &self.mem_budget {
            if moe_runtime::moe::cache::parse_size(budget).is_none() {
                bail!("--mem-budget {budget}: not a size like 512M or 3G");
            }
        }
        if let Some(ctx) = self.ctx {
            if ctx < 8 {
                bail!("--ctx {ctx} is too small (at least 8 positions)");
            }
        }
        if self.threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        Ok(())
    }

    /// Resolves `--target-profile` against this machine and the model's device, and fills the
    /// thread count the flags left unset; the rest is applied where the worker sets up.
    pub fn apply_board(&mut self) -> Result<()> {
        let (board, startup) = moe_runtime::cli::board_defaults(&self.target_profile, &self.model)?;
        if self.threads.is_none() {
            self.threads = board.as_ref().map(|b| b.threads);
        }
        self.board = board;
        self.startup = startup;
        Ok(())
    }

    /// The model id: `--alias`, else the file name without its extension.
    pub fn model_id(&self) -> String {
        self.alias.clone().unwrap_or_else(|| {
            self.model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        })
    }
}

fn parse_kv_type(s: &str) -> Result<KvType, String> {
    KvType::from_name(s).ok_or_else(|| format!("`{s}` is not f16 or f32"))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("`{s}` is not an octal permission mode such as 660")),
    }
}

/// `1048576`, `512K`, `1M`, `2G` (binary multiples; an optional trailing `B`/`iB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("`{s}`: unknown size suffix `{c}` (K, M or G)")),
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{s}` is not a size such as 65536, 512K or 1M"))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().trim_end_matches('s').parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e6 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_modes_and_durations() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("999").is_err());
        assert_eq!(parse_secs("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_secs("-1").is_err());
    }

    #[test]
    fn mem_budget_is_parsed() {
        let cfg = Config::try_parse_from(["moed", "-m", "x.gguf", "--mem-budget", "1G"]).unwrap();
        assert!(cfg.validate().is_ok());
        let cfg = Config::try_parse_from(["moed", "-m", "x.gguf", "--mem-budget", "lots"]).unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a size"));
    }
}
