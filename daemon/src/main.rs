use tracing_subscriber::EnvFilter;

fn main() {
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
