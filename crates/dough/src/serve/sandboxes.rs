//! Sandboxes: made, destroyed and kept in step with their VMs (TTLs,
//! VMs that died or vanished, a daemon that restarted).

use std::time::Instant;

use axum::http::StatusCode;
use dough_client::types::{CreateSandbox, SandboxState};
use dough_fabric::snapshot::Ensured;
use dough_fabric::{Vm, VmKind};

use super::api::{now_unix, ApiError, App};
use super::store::SandboxRow;
use crate::vm_args::{boot_options, resolve_image, ScratchArg};

/// The VM options a request asks for, on top of the daemon's defaults.
fn vm_args(app: &App, req: &CreateSandbox) -> Result<crate::vm_args::VmArgs, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    let mut vm = app.defaults.clone();
    if let Some(image) = &req.image {
        // An id only: a path would make the daemon read (and build) a
        // recipe file of the caller's choosing on this host.
        if image.is_empty() || image.contains('/') || image.starts_with('.') {
            return Err(bad(format!(
                "image: {image:?} is not an image id (`dough image ls`)"
            )));
        }
        vm.image = Some(image.clone());
    }
    if let Some(net) = &req.net {
        vm.net = net.parse().map_err(|e| bad(format!("net: {e}")))?;
    }
    if let Some(m) = req.memory_mib {
        if !(64..=1 << 20).contains(&m) {
            return Err(bad(format!("memory_mib: {m} is not 64 to 1048576")));
        }
        vm.mem = Some(m);
    }
    if let Some(c) = req.vcpus {
        if !(1..=64).contains(&c) {
            return Err(bad(format!("vcpus: {c} is not 1 to 64")));
        }
        vm.cpus = c;
    }
    if let Some(s) = &req.scratch {
        vm.scratch = Some(
            s.parse::<ScratchArg>()
                .map_err(|e| bad(format!("scratch: {e}")))?,
        );
    }
    if let Some(t) = req.ttl_secs {
        if !(1..=10 * 365 * 86400).contains(&t) {
            return Err(bad(format!("ttl_secs: {t} is not 1 to ten years")));
        }
    }
    Ok(vm)
}

/// Make a sandbox and record it.
pub fn create(app: &App, req: &CreateSandbox) -> Result<SandboxRow, ApiError> {
    let vm = vm_args(app, req)?;
    let ctx = &app.ctx;
    let bad = |e: anyhow::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            dough_fabric::serial::printable(&format!("{e:#}")),
        )
    };
    let failed = |e: anyhow::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            dough_fabric::serial::printable(&format!("{e:#}")),
        )
    };
    let (snap, opts) = match &req.snapshot {
        Some(key) if key.is_empty() || key.contains('/') || key.starts_with('.') => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("snapshot: {key:?} is not a snapshot key (`dough snapshots`)"),
            ))
        }
        Some(key) => {
            let snap = crate::live_cmd::find_snapshot(ctx, key).map_err(bad)?;
            let opts = boot_options(&ctx.home, &snap.meta.image, &vm).map_err(bad)?;
            (snap, opts)
        }
        None => {
            let image = resolve_image(ctx, &vm).map_err(bad)?;
            let opts = boot_options(&ctx.home, &image, &vm).map_err(bad)?;
            let got =
                crate::snapshots::ensure_snapshot(ctx, &image, &opts, false).map_err(failed)?;
            if let Ensured::Baked(..) = got {
                app.metrics
                    .bakes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (got.snapshot().clone(), opts)
        }
    };
    let t = Instant::now();
    let v = Vm::restore(&ctx.vms, &snap, VmKind::Clone, &opts).map_err(|e| failed(e.into()))?;
    app.metrics.restore.observe(t.elapsed());
    // Handed over: it outlives this daemon (which adopts it again when it
    // restarts) until it is deleted or its TTL runs out.
    let id = v.detach().map_err(|e| failed(e.into()))?;
    let now = now_unix();
    let row = SandboxRow {
        id: id.clone(),
        state: SandboxState::Live,
        snapshot: snap.key.clone(),
        image: snap.meta.image.id.clone(),
        net: opts.egress.to_string(),
        memory_mib: opts.mem_mib,
        vcpus: opts.cpus,
        created_at: now,
        expires_at: req.ttl_secs.map(|t| now + t as i64),
        ended_at: None,
        ended_why: None,
    };
    if let Err(e) = app.store.put_sandbox(&row) {
        // Not recorded, so not kept: nobody could find it again.
        let _ = dough_fabric::pool::down(&ctx.vms, &id, &crate::vm_args::host_net());
        return Err(e.into());
    }
    app.metrics
        .sandboxes_created
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _ = app.store.event(
        now,
        "sandbox.created",
        &id,
        &serde_json::json!({"snapshot": snap.key, "restore_ms": t.elapsed().as_millis() as u64})
            .to_string(),
    );
    eprintln!("dough: sandbox {id} created from snapshot {}", snap.key);
    Ok(row)
}

/// Stop a sandbox's VM, remove it, and mark it deleted.
pub fn destroy(app: &App, id: &str, why: &str) -> Result<(), ApiError> {
    let lock = || app.deleting.lock().unwrap_or_else(|p| p.into_inner());
    if !lock().insert(id.to_string()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("sandbox {id} is being deleted"),
        ));
    }
    let r = teardown(app, id, why);
    lock().remove(id);
    r
}

fn teardown(app: &App, id: &str, why: &str) -> Result<(), ApiError> {
    match dough_fabric::pool::down(&app.ctx.vms, id, &crate::vm_args::host_net()) {
        Ok(_) => {}
        // Already gone: nothing left to stop.
        Err(dough_fabric::FabricError::State(dough_fabric::state::StateError::Unknown(_))) => {}
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                dough_fabric::serial::printable(&format!("{:#}", anyhow::Error::from(e))),
            ))
        }
    }
    let now = now_unix();
    app.store.end_sandbox(id, SandboxState::Deleted, now, why)?;
    let _ = app.store.event(
        now,
        "sandbox.deleted",
        id,
        &serde_json::json!({ "why": why }).to_string(),
    );
    eprintln!("dough: sandbox {id} destroyed ({why})");
    Ok(())
}

/// Bring the records in step with the VMs: destroy sandboxes whose TTL
/// ran out; mark dead those whose VM stopped (removing what is left of it)
/// or vanished. Run at start (after a restart the daemon adopts every live
/// VM it made) and every second.
pub fn reconcile(app: &App) -> Result<(), ApiError> {
    let now = now_unix();
    let records: std::collections::HashMap<String, dough_fabric::VmRecord> =
        dough_fabric::state::list(&app.ctx.vms)
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
    for row in app
        .store
        .sandboxes(true, &super::store::Page::all())?
        .unwrap_or_default()
    {
        if app
            .deleting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&row.id)
        {
            continue;
        }
        // One sandbox that fails here must not stop the others' TTLs.
        if let Err(e) = reconcile_one(app, &row, &records, now) {
            eprintln!("dough: sandbox {}: {}", row.id, e.message());
        }
    }
    Ok(())
}

fn reconcile_one(
    app: &App,
    row: &SandboxRow,
    records: &std::collections::HashMap<String, dough_fabric::VmRecord>,
    now: i64,
) -> Result<(), ApiError> {
    {
        if row.expires_at.is_some_and(|t| t <= now) {
            destroy(app, &row.id, "its TTL ran out")?;
            app.metrics
                .sandboxes_expired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        let why = match records.get(&row.id) {
            // Not listed is not proof (a directory that could not be read,
            // no file descriptors left): gone only if its directory is.
            None => match std::fs::symlink_metadata(app.ctx.vms.join(&row.id)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    "its VM is gone (removed outside the daemon)"
                }
                _ => return Ok(()),
            },
            Some(r)
                if r.state == dough_fabric::VmState::Dead
                    || r.vmm.is_some_and(|v| !v.is_alive()) =>
            {
                let _ =
                    dough_fabric::pool::down(&app.ctx.vms, &row.id, &crate::vm_args::host_net());
                "its VM stopped"
            }
            Some(_) => return Ok(()),
        };
        app.store
            .end_sandbox(&row.id, SandboxState::Dead, now, why)?;
        let _ = app.store.event(
            now,
            "sandbox.dead",
            &row.id,
            &serde_json::json!({ "why": why }).to_string(),
        );
        eprintln!("dough: sandbox {} is dead: {why}", row.id);
    }
    Ok(())
}
