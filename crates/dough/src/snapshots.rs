//! The warm snapshot a command's VMs restore from, baked first when its
//! inputs changed (saying why).

use dough_fabric::snapshot::Ensured;
use dough_fabric::{BootOptions, SnapshotSpec, SnapshotStore};
use dough_image::Image;

use crate::cli::Ctx;

/// The snapshot for these VM options, baked first if there is none (or
/// if `force`), saying why.
pub fn ensure_snapshot(
    ctx: &Ctx,
    image: &Image,
    opts: &BootOptions,
    force: bool,
) -> anyhow::Result<Ensured> {
    let spec = SnapshotSpec::for_boot(image, opts)?;
    let store = SnapshotStore::new(&ctx.home);
    Ok(store.ensure(&spec, opts, &ctx.vms, force, &mut |m| {
        eprintln!("dough: {m}")
    })?)
}
