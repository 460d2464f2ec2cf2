//! moe-run: one-shot generation and logits dumps (see `moe_runtime::cli`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut err = std::io::stderr();
    match moe_runtime::cli::run(std::env::args_os(), &mut std::io::stdout(), &mut err) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast::<clap::Error>() {
            // --help, --version and usage errors print themselves with clap's exit codes.
            Ok(clap_err) => clap_err.exit(),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
