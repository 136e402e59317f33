//! Building an image from a recipe, inside a builder VM.
//!
//! The builder is a cold-booted VM of the recipe's base image whose root is
//! a private, writable, grown copy of the base's root filesystem (no
//! overlay). Its egress is the recipe's (default `nat`, through its
//! gateway like any clone's). In it, in order: the recipe's certificates
//! are trusted, its files are copied in, its run steps run as root; then
//! the guest settles its filesystem (machine identity emptied, freed blocks
//! discarded, the filesystem frozen so everything is on the disk) and the
//! VM is destroyed. Nothing of a recipe runs on the host, and the host never
//! mounts or parses what the steps made.

use std::path::Path;
use std::time::Duration;

use dough_image::recipe::LoadedRecipe;
use dough_image::{Event, Image, ImageError, Store};
use dough_proto::{ExitStatus, Stream};

use crate::channel::ExecRequest;
use crate::vm::{ca_env, Vm, GUEST_BUNDLE, GUEST_CA_PATH};
use crate::BootOptions;

/// What a build reports besides the image pipeline's own events.
#[derive(Debug)]
pub enum BuildOutput<'a> {
    /// A step starts: `n` of `of`, what it is.
    Step { n: usize, of: usize, what: &'a str },
    /// Output of the running step, as the guest wrote it.
    Output(Stream, &'a [u8]),
}

/// Where the recipe's certificates also go, so that a later
/// `update-ca-certificates` in a run step keeps them in the bundle.
const LOCAL_CA: &str = "/usr/local/share/ca-certificates/dough-recipe.crt";

/// The last step of every build: no machine identity in the image (each
/// clone gets its own), the hostname back to the image's, freed blocks
/// discarded (they become holes in the image file), everything written
/// out (`sync` flushes the disk's cache too), and the root made read-only
/// so that nothing more is written before the VM is destroyed (left
/// writable only when a process a step started still holds a file open
/// for writing; the sync has happened either way). Prints how it ended.
const SETTLE: &str = "set -e; : > /etc/machine-id; echo dough > /etc/hostname; \
    fstrim / >/dev/null 2>&1 || true; sync; \
    if mount -o remount,ro / 2>/dev/null; then echo root read-only; else echo root synced; fi";

/// The image `recipe` makes from `base`, from the cache or built in a
/// builder VM with `opts` (its VMM, accelerator, host network and deadline;
/// memory and egress come from the recipe).
pub fn build_recipe(
    store: &Store,
    vms_dir: &Path,
    base: &Image,
    recipe: &LoadedRecipe,
    opts: &BootOptions,
    progress: &mut dyn FnMut(Event),
    out: &mut dyn FnMut(BuildOutput<'_>),
) -> Result<Image, ImageError> {
    let settings = &recipe.recipe.build;
    let fail = |what: String, source: Option<Box<dyn std::error::Error + Send + Sync>>| {
        ImageError::RecipeBuild {
            recipe: recipe.path.display().to_string(),
            what,
            source,
        }
    };
    let egress: dough_net::Egress =
        settings.egress.parse().map_err(|e: dough_net::PlanError| {
            fail(
                format!("build.egress {:?} is not a policy", settings.egress),
                Some(Box::new(e)),
            )
        })?;
    let mut env = recipe.env();
    if !recipe.ca_pem.is_empty() {
        env = ca_env().into_iter().chain(env).collect();
    }
    let boot = BootOptions {
        mem_mib: settings.mem_mib,
        egress,
        brokers: Vec::new(),
        ca: None,
        trust: Vec::new(),
        root_rw: true,
        // Its root is its disk: no other writable layer.
        scratch: None,
        ..opts.clone()
    };
    let steps = &recipe.recipe.run;
    let of = usize::from(!recipe.ca_pem.is_empty())
        + usize::from(!recipe.files.is_empty())
        + steps.len()
        + 2;
    let step_limit = Duration::from_secs(settings.step_timeout_secs);
    store.build_recipe(base, recipe, env.clone(), progress, &mut |rootfs| {
        let mut n = 1;
        out(BuildOutput::Step {
            n,
            of,
            what: "boot the builder VM",
        });
        let image = Image {
            rootfs: rootfs.to_path_buf(),
            ..base.clone()
        };
        let mut vm = Vm::boot(vms_dir, &image, &boot)
            .map_err(|e| fail("the builder VM did not start".into(), Some(Box::new(e))))?;
        let run = |vm: &mut Vm,
                   what: &str,
                   argv: Vec<String>,
                   stdin: Option<Vec<u8>>,
                   env: &[(String, String)],
                   out: &mut dyn FnMut(BuildOutput<'_>)|
         -> Result<(), ImageError> {
            let req = ExecRequest {
                argv,
                env: env.to_vec(),
                cwd: Some("/root".into()),
                stdin,
                timeout: Some(step_limit),
            };
            let status = vm
                .exec(&req, &mut |s, b| out(BuildOutput::Output(s, b)))
                .map_err(|e| fail(format!("{what}: the builder VM failed"), Some(Box::new(e))))?;
            match status {
                ExitStatus::Exited(0) => Ok(()),
                ExitStatus::TimedOut => Err(fail(
                    format!(
                        "{what}: still running after build.step_timeout_secs ({}s)",
                        step_limit.as_secs()
                    ),
                    None,
                )),
                ExitStatus::Exited(c) => Err(fail(format!("{what} exited with code {c}"), None)),
                ExitStatus::Signaled(sig) => {
                    Err(fail(format!("{what} was killed by signal {sig}"), None))
                }
                ExitStatus::SpawnFailed(why) => {
                    Err(fail(format!("{what} could not start: {why}"), None))
                }
            }
        };
        if !recipe.ca_pem.is_empty() {
            n += 1;
            out(BuildOutput::Step {
                n,
                of,
                what: "trust the recipe's certificates",
            });
            let script = format!(
                "set -e; mkdir -p /etc/dough /etc/ssl/certs {dir}; cat > {GUEST_CA_PATH}; \
                 cp {GUEST_CA_PATH} {LOCAL_CA}; printf '\\n' >> {GUEST_BUNDLE}; \
                 cat {GUEST_CA_PATH} >> {GUEST_BUNDLE}",
                dir = Path::new(LOCAL_CA)
                    .parent()
                    .expect("has a parent")
                    .display()
            );
            let argv = vec!["sh".into(), "-c".into(), script];
            let pem = recipe.ca_pem.clone().into_bytes();
            run(&mut vm, "ca", argv, Some(pem), &[], out)?;
        }
        if !recipe.files.is_empty() {
            n += 1;
            out(BuildOutput::Step {
                n,
                of,
                what: "copy the recipe's files in",
            });
            for f in &recipe.files {
                // The path and mode are arguments, never spliced into the script.
                let argv = [
                    "sh",
                    "-c",
                    "set -e; mkdir -p \"$(dirname \"$1\")\"; cat > \"$1\"; chmod \"$2\" \"$1\"",
                    "sh",
                    &f.dest,
                    &format!("{:o}", f.mode),
                ]
                .map(String::from)
                .to_vec();
                let what = format!("file {}", f.dest);
                run(&mut vm, &what, argv, Some(f.data.clone()), &[], out)?;
            }
        }
        for (i, step) in steps.iter().enumerate() {
            n += 1;
            out(BuildOutput::Step { n, of, what: step });
            let argv = vec!["sh".into(), "-ec".into(), step.clone()];
            let what = format!("run step {} (`{}`)", i + 1, first_line(step));
            run(&mut vm, &what, argv, None, &env, out)?;
        }
        n += 1;
        out(BuildOutput::Step {
            n,
            of,
            what: "settle the filesystem",
        });
        let argv = vec!["sh".into(), "-c".into(), SETTLE.into()];
        run(&mut vm, "settling the filesystem", argv, None, &[], out)?;
        vm.destroy()
            .map_err(|e| fail("stopping the builder VM".into(), Some(Box::new(e))))?;
        Ok(())
    })
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    match l.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &l[..i]),
        None => l.to_string(),
    }
}
