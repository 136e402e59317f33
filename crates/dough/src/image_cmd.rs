//! `dough image build|ls`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use dough_image::recipe::{LoadedRecipe, HOST_CA_BUNDLE};
use dough_image::{Event, Image, ImageSpec, Store};

use crate::cli::Ctx;
use crate::vm_args::{AccelArg, BackendArg, VmArgs};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build the guest image (kernel, initramfs, rootfs), or with --recipe
    /// an agent's image on top of it; everything is cached by content.
    Build(BuildArgs),
    /// List built images, newest first.
    Ls,
}

#[derive(Debug, Clone, Args)]
pub struct AgentArg {
    /// The static guest agent binary (see scripts/build-agent).
    #[arg(long, env = "DOUGH_AGENT")]
    pub agent: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub agent: AgentArg,
    /// Extra Debian packages for the rootfs (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub packages: Vec<String>,
    /// apt mirror for the rootfs (default: read from this machine's apt sources).
    #[arg(long, env = "DOUGH_APT_MIRROR")]
    pub mirror: Option<String>,
    /// Build the image a recipe (TOML: base packages, CA certificates, env,
    /// files, run steps; docs/images.md) makes on top of its base image.
    /// The run steps execute as root inside a builder VM with the recipe's
    /// egress, never on this host. Unchanged recipes are cache hits.
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub builder: BuilderArgs,
}

/// How a recipe's builder VM runs (its memory and egress come from the recipe).
#[derive(Debug, Clone, Args)]
pub struct BuilderArgs {
    /// The builder VM's VMM (a recipe only).
    #[arg(long, value_enum, default_value = "qemu", env = "DOUGH_BACKEND")]
    pub backend: BackendArg,
    /// Firecracker binary, for --backend firecracker.
    #[arg(
        long,
        default_value = "firecracker",
        env = "DOUGH_FIRECRACKER",
        value_name = "PATH"
    )]
    pub firecracker: PathBuf,
    /// The builder VM's accelerator (TCG where KVM does not boot guests).
    #[arg(long, value_enum, default_value = "auto", env = "DOUGH_ACCEL")]
    pub accel: AccelArg,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", env = "DOUGH_QEMU")]
    pub qemu: PathBuf,
    /// Seconds the builder VM may take to boot.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub boot_timeout: u64,
    #[arg(long, default_value = dough_net::plan::DEFAULT_POOL, env = "DOUGH_NET_POOL", value_name = "CIDR")]
    pub net_pool: dough_net::Ipv4Net,
}

impl BuildArgs {
    /// A plain image build (no recipe) with this agent.
    pub fn plain(agent: AgentArg) -> BuildArgs {
        BuildArgs {
            agent,
            packages: vec![],
            mirror: None,
            recipe: None,
            builder: BuilderArgs {
                backend: BackendArg::Qemu,
                firecracker: "firecracker".into(),
                accel: AccelArg::Auto,
                qemu: "qemu-system-x86_64".into(),
                boot_timeout: 120,
                net_pool: dough_net::plan::DEFAULT_POOL.parse().expect("valid pool"),
            },
        }
    }

    /// A build for a command that boots `vm` (its agent, and its VMM
    /// settings for a recipe's builder).
    pub fn for_vm(vm: &VmArgs) -> BuildArgs {
        let mut b = BuildArgs::plain(vm.agent.clone());
        b.builder = BuilderArgs {
            backend: vm.backend,
            firecracker: vm.firecracker.clone(),
            accel: vm.accel,
            qemu: vm.qemu.clone(),
            boot_timeout: vm.boot_timeout.max(b.builder.boot_timeout),
            net_pool: vm.net_pool,
        };
        b
    }

    fn vm_args(&self) -> VmArgs {
        let b = &self.builder;
        VmArgs {
            backend: b.backend,
            firecracker: b.firecracker.clone(),
            firecracker_pci: false,
            accel: b.accel,
            mem: None,
            cpus: 1,
            boot_timeout: b.boot_timeout,
            qemu: b.qemu.clone(),
            image: None,
            kernel_args: vec![],
            tcg_cache: None,
            net: dough_net::Egress::None,
            net_pool: b.net_pool,
            ca: vec![],
            scratch: Some(crate::vm_args::ScratchArg::None),
            agent: self.agent.clone(),
        }
    }
}

/// Where to find the agent: the flag or `$DOUGH_AGENT`, else next to this
/// executable, else where `scripts/build-agent` puts it in a cargo target dir.
pub fn find_agent(arg: &AgentArg) -> anyhow::Result<PathBuf> {
    if let Some(p) = &arg.agent {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("locating the dough executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join("../x86_64-unknown-linux-gnu/release/dough-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/release/dough-agent"),
        dir.join("dough-agent"),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "cannot find the guest agent binary (looked next to {}); build it with scripts/build-agent or pass --agent",
            exe.display()
        )
    })
}

/// Progress lines for an image build, on stderr.
pub fn print_event(e: Event) {
    match e {
        Event::Started { step, detail } => eprintln!("dough: [{step}] building: {detail}"),
        Event::Cached { step, key } => eprintln!("dough: [{step}] cached ({key})"),
        Event::Built { step, key, secs } => eprintln!("dough: [{step}] built {key} in {secs:.1}s"),
        Event::UpToDate { id } => eprintln!("dough: image {id} is up to date; nothing to build"),
    }
}

/// Build (or reuse) the image for the default spec plus `args` (and the
/// recipe's base, with `--recipe`; the recipe's own image is built by
/// [`build_recipe`]).
pub fn build(home: &Path, args: &BuildArgs) -> anyhow::Result<Image> {
    build_base(home, args, None)
}

fn build_base(
    home: &Path,
    args: &BuildArgs,
    recipe: Option<&LoadedRecipe>,
) -> anyhow::Result<Image> {
    let agent = find_agent(&args.agent)?;
    let mut spec = ImageSpec::new(agent);
    if let Some(r) = recipe {
        spec.suite = r.recipe.base.suite.clone();
        spec.packages.extend(r.recipe.base.packages.iter().cloned());
    }
    spec.packages.extend(args.packages.iter().cloned());
    spec.mirror = args.mirror.clone();
    let t = std::time::Instant::now();
    let img = Store::new(home)
        .build(&spec, &mut print_event)
        .context("building the guest image")?;
    eprintln!(
        "dough: image {} ready ({:.1}s)",
        img.id,
        t.elapsed().as_secs_f64()
    );
    Ok(img)
}

/// Build (or reuse) the image the recipe at `path` makes: its base image
/// first, then its steps in a builder VM.
pub fn build_recipe(ctx: &Ctx, path: &Path, args: &BuildArgs) -> anyhow::Result<Image> {
    let recipe = LoadedRecipe::load(path, Path::new(HOST_CA_BUNDLE))?;
    let base = build_base(&ctx.home, args, Some(&recipe))?;
    let store = Store::new(&ctx.home);
    // Only boot (and say TCG is no boundary) when there is something to build.
    if let Some(img) = store.cached_recipe_image(&base, &recipe, &mut print_event)? {
        return Ok(img);
    }
    let opts = crate::vm_args::boot_options(&ctx.home, &base, &args.vm_args())?;
    let t = std::time::Instant::now();
    let mut on_output = |o: dough_fabric::builder::BuildOutput<'_>| {
        use std::io::Write;
        match o {
            dough_fabric::builder::BuildOutput::Step { n, of, what } => {
                let what = dough_fabric::serial::printable(what);
                eprintln!("dough: [recipe {n}/{of}] {what}");
            }
            dough_fabric::builder::BuildOutput::Output(_, bytes) => {
                let text = dough_fabric::serial::printable(&String::from_utf8_lossy(bytes));
                let _ = std::io::stderr().write_all(text.as_bytes());
            }
        }
    };
    let img = dough_fabric::builder::build_recipe(
        &store,
        &ctx.vms,
        &base,
        &recipe,
        &opts,
        &mut print_event,
        &mut on_output,
    )
    .with_context(|| format!("building the image of recipe {}", path.display()))?;
    eprintln!(
        "dough: image {} ({}) ready ({:.1}s)",
        img.id,
        recipe.name,
        t.elapsed().as_secs_f64()
    );
    Ok(img)
}

pub fn run(ctx: &Ctx, cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    let home = &ctx.home;
    match cmd {
        ImageCmd::Build(args) => {
            // A plain build becomes the image commands boot by default; a
            // recipe's is named where it is used (--image, a plan's `image`).
            let img = match &args.recipe {
                Some(r) => build_recipe(ctx, r, &args)?,
                None => {
                    let img = build(home, &args)?;
                    Store::new(home).set_current(&img.id)?;
                    img
                }
            };
            println!("{}", img.id);
        }
        ImageCmd::Ls => {
            let store = Store::new(home);
            let current = store.current().ok().map(|i| i.id);
            let images = store.list()?;
            if images.is_empty() {
                eprintln!("dough: no images yet; run `dough image build`");
            }
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            // ROOTFS: what the root filesystem takes on disk (it is sparse)
            // of its size.
            writeln!(
                out,
                "{:<18} {:<3} {:<14} {:<28} {:>15} {:>7}  PACKAGES",
                "ID", "CUR", "RECIPE", "KERNEL", "ROOTFS", "INITRD"
            )?;
            for i in images {
                let mib = |p: &Path| {
                    std::fs::metadata(p)
                        .map(|m| format!("{}M", m.len() >> 20))
                        .unwrap_or_else(|_| "missing".into())
                };
                let rootfs = match (
                    dough_image::allocated_bytes(&i.rootfs),
                    std::fs::metadata(&i.rootfs),
                ) {
                    (Ok(used), Ok(m)) => format!("{}M/{}M", used >> 20, m.len() >> 20),
                    _ => "missing".into(),
                };
                let recipe = match &i.recipe {
                    Some(r) => format!("{} on {}", r.name, &r.base[..r.base.len().min(6)]),
                    None => "-".into(),
                };
                writeln!(
                    out,
                    "{:<18} {:<3} {:<14} {:<28} {:>15} {:>7}  {}",
                    i.id,
                    if current.as_deref() == Some(i.id.as_str()) {
                        "*"
                    } else {
                        ""
                    },
                    recipe,
                    i.kernel_release,
                    rootfs,
                    mib(&i.initrd),
                    i.packages.join(",")
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
