//! The `dough` command line.

mod agent_cmd;
mod bench_api;
mod bench_cmd;
mod bench_fork;
mod bench_gateway;
mod bench_scratch;
mod broker_args;
mod cli;
mod doctor;
mod exec_args;
mod go_cmd;
mod image_cmd;
mod live_cmd;
mod plan_cmd;
mod remote;
mod run_cmd;
mod serve;
mod snapshots;
mod teardown;
mod vm_args;
mod vm_cmds;
mod watchdog;

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = cli::apply_config_file(&argv) {
        eprintln!("dough: error: {e:#}");
        return ExitCode::from(2);
    }
    let args = <cli::Cli as clap::Parser>::parse_from(argv);
    cli::init_tracing(args.verbose);
    dough_fabric::notice::set_sink(|m| eprintln!("dough: {}", dough_fabric::serial::printable(m)));
    let result = cli::dispatch(args);
    match result {
        // A signal is tearing this process's VMs down: whatever the main
        // thread ended with (an error, or a run that finished early
        // because its clones vanished) is a consequence; the signal thread
        // finishes the teardown and exits 130.
        _ if teardown::tearing_down() => loop {
            std::thread::park();
        },
        Ok(code) => code,
        // Its reader went away (`dough ps | head`): nothing more to say.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            cli::print_error("", e.as_ref());
            ExitCode::from(125)
        }
    }
}
