use tracing_subscriber::EnvFilter;

/// Counts live heap bytes for /metrics (`moed_heap_bytes`): see `moe_daemon::alloc`.
#[global_allocator]
static ALLOC: moe_daemon::alloc::CountingAlloc = moe_daemon::alloc::CountingAlloc;

fn main() {
    moe_daemon::alloc::mark_installed();
    let cfg = moe_daemon::Config::from_env_and_args();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if let Err(e) = moe_daemon::run(cfg) {
        tracing::error!("{e:#}");
        eprintln!("moed: {e:#}");
        std::process::exit(1);
    }
}
