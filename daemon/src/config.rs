//! Command-line flags. Every flag can also come from a `MOED_*` environment variable, so a
//! systemd `EnvironmentFile=` (see `targets/moed.env`) serves as the configuration file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use moe_runtime::cli::args::{parse_kv_type, StreamingArgs};
use moe_runtime::engine::SessionOptions;
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
    /// Board profile giving the defaults of threads, memory budget and expert streaming: auto
    /// (detect the CPU and RAM), none, pi5, pi4, zero2w, generic-aarch64, x86_64 or a .toml
    /// file; NAME:STORAGE names the model's device (e.g. pi4:usb-ssd). Flags still win
    #[arg(long, env = "MOED_TARGET_PROFILE", default_value = "auto")]
    pub target_profile: String,
    /// Worker threads for the forward pass (default: the board profile's, else all cores)
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
    /// Expert streaming (each flag also reads MOED_<FLAG>, e.g. MOED_MEM_BUDGET)
    #[command(flatten)]
    pub streaming: StreamingArgs,
    /// Conversations whose KV cache is kept so that a request sharing a prompt prefix with one
    /// of them evaluates only the rest (the one served last included; each takes a whole KV
    /// cache of memory); 0 evaluates every prompt whole
    #[arg(long, env = "MOED_PROMPT_CACHE", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub prompt_cache: u32,
    /// Requests generated at once, each in its own slot with its own KV cache (N whole KV
    /// caches of memory, which the memory budget counts): their tokens are decoded together
    /// in one batch per step, so that an expert several of them use is read once. Requests
    /// beyond N wait in the queue
    #[arg(long, env = "MOED_PARALLEL", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// A Jinja chat template to use instead of the model's (e.g. one of llama.cpp's
    /// models/templates); without either, chat uses ChatML
    #[arg(long, env = "MOED_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Skip the warm-up forward pass after loading
    #[arg(long, env = "MOED_NO_WARMUP")]
    pub no_warmup: bool,
    /// Test hook: sleep this many milliseconds after every generated token
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_token_delay_ms: u64,
    /// Test hook: sleep this many milliseconds before loading the model
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_load_delay_ms: u64,
}

impl Config {
    /// The flags, each of them also readable from its `MOED_*` environment variable (the
    /// streaming flags, shared with moe-run, get theirs here).
    pub fn command() -> clap::Command {
        <Self as clap::CommandFactory>::command().mut_args(|a| {
            if a.get_env().is_some() || a.is_positional() || a.get_id() == "help" {
                return a;
            }
            let var = format!("MOED_{}", a.get_id().as_str().to_uppercase());
            // clap keeps environment names as `&'static str`; a few flags, once per process.
            a.env(&*Box::leak(var.into_boxed_str()))
        })
    }

    /// Parses the process's arguments and environment. A configuration error exits with
    /// status 1 like every other start-up failure (help and version exit 0).
    pub fn from_env_and_args() -> Self {
        let parsed = Self::command()
            .try_get_matches()
            .and_then(|m| <Self as clap::FromArgMatches>::from_arg_matches(&m));
        parsed.unwrap_or_else(|e| {
            if e.use_stderr() {
                let _ = e.print();
                std::process::exit(1);
            }
            e.exit()
        })
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<()> {
        if let Some(ctx) = self.ctx {
            if ctx < 8 {
                bail!("--ctx {ctx} is too small (at least 8 positions)");
            }
        }
        if self.threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        if self.streaming.route_replay.is_some() {
            bail!(
                "--route-replay is for benchmarks (moe-run bench): its answers would not be the \
                 model's, so moed does not serve them"
            );
        }
        Ok(())
    }

    /// `--chat-template`'s path and text.
    pub fn chat_template_source(&self) -> Result<Option<(PathBuf, String)>> {
        let Some(path) = &self.chat_template else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--chat-template {}: {e}", path.display()))?;
        Ok(Some((path.clone(), text)))
    }

    /// What the runtime needs to set up the model's session.
    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            target_profile: self.target_profile.clone(),
            threads: self.threads,
            n_ctx: self.ctx,
            kv_type: self.kv_type,
            streaming: self.streaming.options(),
            // Every sequence that may exist at once: conversations kept, slots running.
            extra_sequences: self.prompt_cache.max(self.parallel).max(1) as usize - 1,
            profiling: false,
        }
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

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("`{s}` is not an octal permission mode such as 660")),
    }
}

/// `1048576`, `512K`, `1M`, `2G`: the runtime's size grammar.
pub fn parse_size(s: &str) -> Result<u64, String> {
    moe_runtime::units::parse_size(s).map_err(|e| e.to_string())
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
        // A bad size is refused when the flags are parsed.
        let err = Config::try_parse_from(["moed", "-m", "x.gguf", "--mem-budget", "lots"]);
        assert!(err.unwrap_err().to_string().contains("not a size"));
    }

    #[test]
    fn replayed_routing_is_not_served() {
        let cfg = Config::try_parse_from(["moed", "-m", "x.gguf", "--route-replay", "t"]).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("benchmarks"), "{err}");
    }
}
