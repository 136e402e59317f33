//! `dough --host URL ...` (or `DOUGH_HOST`): `up`, `ps`, `exec` and `down`
//! through a `dough serve` daemon instead of on this machine.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine;
use dough_client::{Client, CreateSandbox, ExecBody, ExecEvent, SandboxState};

use crate::cli::{Command, Ctx};

/// The client for `host`: its token from `DOUGH_TOKEN`, else the daemon's
/// token file under this home (a daemon on this machine).
fn client(ctx: &Ctx, host: &str) -> anyhow::Result<Client> {
    let token = match std::env::var("DOUGH_TOKEN") {
        Ok(t) => t,
        Err(_) => {
            let f = ctx.home.join("serve.token");
            std::fs::read_to_string(&f).with_context(|| {
                format!(
                    "no token: set DOUGH_TOKEN to the daemon's token (its {} on its host)",
                    f.display()
                )
            })?
        }
    };
    Ok(Client::new(host, &token)?)
}

fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// Run `command` through the daemon at `host`.
pub fn dispatch(ctx: &Ctx, host: &str, command: Command) -> anyhow::Result<ExitCode> {
    let c = client(ctx, host)?;
    match command {
        Command::Up(a) => {
            // Only what was given: the daemon's own defaults stand for the rest.
            let req = CreateSandbox {
                image: a.vm.image.clone(),
                snapshot: a.from.clone(),
                net: (a.vm.net != dough_net::Egress::Nat).then(|| a.vm.net.to_string()),
                memory_mib: a.vm.mem,
                vcpus: (a.vm.cpus != 1).then_some(a.vm.cpus),
                scratch: a.vm.scratch.map(|s| match s {
                    crate::vm_args::ScratchArg::None => "none".to_string(),
                    crate::vm_args::ScratchArg::Mib(m) => format!("{m}M"),
                }),
                ttl_secs: None,
            };
            let mut out = std::io::stdout().lock();
            for _ in 0..a.count {
                let sb = c.create_sandbox(&req)?;
                writeln!(out, "{}", sb.id)?;
                out.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ps(a) => {
            // (Filtered again: a daemon older than `live=true` lists all.)
            let all: Vec<_> = c
                .live_sandboxes()?
                .into_iter()
                .filter(|s| s.state == SandboxState::Live)
                .collect();
            let mut out = std::io::stdout().lock();
            if a.json {
                serde_json::to_writer_pretty(&mut out, &all)?;
                writeln!(out)?;
                return Ok(ExitCode::SUCCESS);
            }
            let now = crate::serve::now_unix();
            writeln!(
                out,
                "{:<12} {:<9} {:>5} {:>6} {:>4} NET",
                "ID", "STATE", "AGE", "MEM", "CPUS"
            )?;
            for s in all {
                writeln!(
                    out,
                    "{:<12} {:<9} {:>5} {:>5}M {:>4} {}",
                    s.id,
                    s.vm_state.as_deref().unwrap_or("-"),
                    age(now - s.created_at),
                    s.memory_mib,
                    s.vcpus,
                    s.net
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec(a) => {
            let req = a.exec.request()?;
            let body = ExecBody {
                argv: req.argv,
                env: req.env.into_iter().collect::<BTreeMap<_, _>>(),
                cwd: req.cwd,
                timeout_secs: req.timeout.map(|t| t.as_secs_f64()),
                stdin: None,
                stdin_b64: req
                    .stdin
                    .map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
            };
            let exit = c.exec(&a.id, &body, &mut |e| match e {
                ExecEvent::Stdout(b) => {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&b).and_then(|_| o.flush());
                }
                ExecEvent::Stderr(b) => {
                    let _ = std::io::stderr().lock().write_all(&b);
                }
                ExecEvent::Start(_) => {}
            })?;
            if exit.timed_out {
                eprintln!("dough: command timed out and was killed");
            } else if let Some(s) = exit.signal {
                eprintln!("dough: command killed by signal {s}");
            } else if let Some(why) = &exit.spawn_error {
                eprintln!("dough: command could not be started: {why}");
            }
            Ok(ExitCode::from(exit.exit_code.clamp(0, 255) as u8))
        }
        Command::Down(a) => {
            let ids = if a.all {
                c.live_sandboxes()?
                    .into_iter()
                    .filter(|s| s.state == SandboxState::Live)
                    .map(|s| s.id)
                    .collect()
            } else {
                a.ids
            };
            let mut failed = false;
            for id in ids {
                match c.delete_sandbox(&id) {
                    Ok(()) => eprintln!("dough: {id} stopped and removed"),
                    Err(e) => {
                        failed = true;
                        crate::cli::print_error(&format!("{id}: "), &e);
                    }
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        other => {
            let name = format!("{other:?}");
            let name = name
                .split(['(', ' '])
                .next()
                .unwrap_or("this")
                .to_lowercase();
            anyhow::bail!(
                "`dough {name}` does not work through --host (DOUGH_HOST) yet: up, ps, exec and down do; \
                 the API has more (docs/api.md)"
            )
        }
    }
}
