//! `dough snapshot`, `dough fork`, `dough snapshots`: saving live clones
//! and restoring copies of them (see `dough_fabric::live`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use dough_fabric::live::{self, After};
use dough_fabric::{Snapshot, SnapshotStore};

use crate::cli::Ctx;
use crate::vm_args::{boot_options, VmArgs};

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The clone (id or unique prefix).
    pub id: String,
    /// Leave the clone paused afterwards (default: it runs on).
    #[arg(long)]
    pub pause: bool,
    /// VMM options for the VM that makes the snapshot (its memory, vCPUs,
    /// image and accelerator are the clone's).
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The clone to fork (id or unique prefix).
    pub id: String,
    /// How many forks.
    #[arg(default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub count: u32,
    /// Network and VMM options for the forks (their memory, vCPUs, image
    /// and accelerator are the clone's).
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The complete snapshot `key` (or the one whose key starts with it).
pub fn find_snapshot(ctx: &Ctx, key: &str) -> anyhow::Result<Snapshot> {
    let store = SnapshotStore::new(&ctx.home);
    if let Some(s) = store.get(key) {
        return Ok(s);
    }
    let found: Vec<Snapshot> = store
        .list()
        .into_iter()
        .filter(|s| s.key.starts_with(key))
        .collect();
    match found.len() {
        1 => Ok(found.into_iter().next().expect("one")),
        0 => anyhow::bail!("no snapshot {key:?} (`dough snapshots` lists them)"),
        n => anyhow::bail!("{n} snapshots start with {key:?}: give more of the key"),
    }
}

fn save(ctx: &Ctx, id: &str, after: After, vm: &VmArgs) -> anyhow::Result<Snapshot> {
    let store = SnapshotStore::new(&ctx.home);
    let image = crate::vm_args::resolve_image(ctx, vm)?;
    let opts = boot_options(&ctx.home, &image, vm)?;
    let t = Instant::now();
    let snap = live::snapshot(&ctx.vms, &store, id, after, &opts, &mut |m| {
        eprintln!("dough: {m}")
    })
    .with_context(|| format!("snapshotting {id}"))?;
    eprintln!(
        "dough: saved {} as snapshot {} in {:.2}s (memory file {} MiB on disk{})",
        snap.meta.parent.as_ref().map_or(id, |p| p.vm.as_str()),
        snap.key,
        t.elapsed().as_secs_f64(),
        dough_fabric::snapshot::disk_usage(&snap.dir) >> 20,
        if after == After::StayPaused {
            "; the clone stays paused"
        } else {
            ""
        }
    );
    Ok(snap)
}

pub fn snapshot(ctx: &Ctx, args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let after = match args.pause {
        true => After::StayPaused,
        false => After::Resume,
    };
    crate::teardown::install_teardown_on_signal(&ctx.vms);
    let snap = save(ctx, &args.id, after, &args.vm)?;
    println!("{}", snap.key);
    Ok(ExitCode::SUCCESS)
}

pub fn fork(ctx: &Ctx, args: ForkArgs) -> anyhow::Result<ExitCode> {
    crate::teardown::install_teardown_on_signal(&ctx.vms);
    let snap = save(ctx, &args.id, After::Resume, &args.vm)?;
    let opts = boot_options(&ctx.home, &snap.meta.image, &args.vm)?;
    crate::vm_cmds::restore_clones(ctx, &snap, &opts, args.count as usize)
}

pub fn list(ctx: &Ctx, args: SnapshotsArgs) -> anyhow::Result<ExitCode> {
    let store = SnapshotStore::new(&ctx.home);
    let snaps = store.list();
    let in_use: Vec<String> = dough_fabric::state::list(&ctx.vms)
        .into_iter()
        .filter_map(|r| r.snapshot)
        .collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        let v: Vec<serde_json::Value> = snaps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "key": s.key,
                    "dir": s.dir,
                    "created_unix": s.meta.created_unix,
                    "parent": s.meta.parent,
                    "image": s.meta.image.id,
                    "mem_mib": s.meta.mem_mib,
                    "backend": s.meta.backend.to_string(),
                    "bytes_on_disk": dough_fabric::snapshot::disk_usage(&s.dir),
                    "clones": in_use.iter().filter(|k| **k == s.key).count(),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<17} {:<6} {:<30} {:>6} {:>9} {:>6}",
        "KEY", "KIND", "FROM", "MEM", "ON DISK", "CLONES"
    )?;
    for s in &snaps {
        let (kind, from) = match &s.meta.parent {
            Some(p) => ("live", format!("{} of {}", p.vm, &p.snapshot)),
            None => ("baked", s.meta.image.id.clone()),
        };
        writeln!(
            out,
            "{:<17} {:<6} {:<30} {:>6} {:>9} {:>6}",
            s.key,
            kind,
            from,
            format!("{}M", s.meta.mem_mib),
            format!("{}M", dough_fabric::snapshot::disk_usage(&s.dir) >> 20),
            in_use.iter().filter(|k| **k == s.key).count(),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
