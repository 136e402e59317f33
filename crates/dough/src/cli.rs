//! Argument parsing and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{doctor, image_cmd, run_cmd};

/// dough runs autonomous coding agents inside microVMs.
///
/// Guests boot from a cached image (kernel + initramfs with dough's agent as
/// PID 1 + a read-only Debian rootfs) under QEMU microvm. Each VM's writable
/// layer is a tmpfs inside the guest, so nothing a command does survives it.
#[derive(Debug, Parser)]
#[command(name = "dough", version, propagate_version = true)]
pub struct Cli {
    /// dough's state and cache directory.
    #[arg(long, global = true, env = "DOUGH_HOME")]
    pub home: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build or list guest images.
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Boot a fresh VM, run CMD in it, stream its output, exit with its exit
    /// code and destroy the VM.
    ///
    /// Example: dough run -- python3 -c 'print(6*7)'
    Run(run_cmd::RunArgs),
    /// Check that this host has what dough needs, and say what to install.
    Doctor(doctor::DoctorArgs),
}

pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// `$DOUGH_HOME`, else `$XDG_DATA_HOME/dough`, else `~/.local/share/dough`.
pub fn home_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(h) = flag {
        return Ok(h);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("dough"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow::anyhow!("neither DOUGH_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".local/share/dough"))
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let home = home_dir(cli.home)?;
    match cli.command {
        Command::Image(cmd) => image_cmd::run(&home, cmd),
        Command::Run(args) => run_cmd::run(&home, args),
        Command::Doctor(args) => doctor::run(&home, args),
    }
}
