//! `dough-gateway`: one clone's egress gateway, as a program of its own.
//! dough starts it with its listening sockets already made inside the
//! clone's network namespace (descriptors 3, 4, 5) and its configuration
//! (which may hold secrets) on standard input. It is the same code as
//! `dough gateway`, in a binary that links the gateway alone: what a
//! process costs per clone is mostly its binary's relocated pages, and
//! this one is a fraction of dough's size.

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let config = match dough_gateway::Config::read_from(std::io::stdin().lock()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dough-gateway: reading the configuration from standard input: {e}");
            return ExitCode::from(2);
        }
    };
    let sockets = match dough_gateway::server::Sockets::inherited() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dough-gateway: its sockets (dough starts this program itself): {e}");
            return ExitCode::from(2);
        }
    };
    match dough_gateway::server::run(config, sockets) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dough-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
