//! `airlock`: run AI coding agents in disposable sandboxes.
//!
//! This binary is thin: it parses the command line, prints for humans or
//! machines, and maps errors to documented exit codes. The work is in
//! `airlock-sandbox` and the crates below it.
//!
//! Exit codes: 0 success; 1 an airlock error (message on stderr); 2 bad
//! usage; for `run` and `exec`, the command's own exit status, or 125 when
//! airlock itself failed, 126 when the command cannot be executed, 127 when
//! it is not found (the `docker run` convention).

mod cli;
mod commands;

use std::process::ExitCode;

fn main() -> ExitCode {
    // The namespace backend re-executes this binary as the sandbox's init;
    // that must happen before anything else (no threads yet). Diverges for
    // `airlock __ns-init ...`, returns otherwise.
    airlock_backend::ns_init_if_requested();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Hidden entry points used by airlock itself, dispatched before clap so
    // that they stay cheap.
    if let Some(code) = commands::hidden_entry(&args) {
        return ExitCode::from(code);
    }
    let args = commands::plugin_args(args);
    let cli = match <cli::Cli as clap::Parser>::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            });
        }
    };
    let attached = cli.command.is_attached();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprint!("airlock: error: {e}");
            for cause in e.chain().skip(1) {
                eprint!(": {cause}");
            }
            eprintln!();
            ExitCode::from(if attached { 125 } else { 1 })
        }
    }
}
