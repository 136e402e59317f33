//! `dough image build|ls`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use dough_image::{Event, Image, ImageSpec, Store};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build the guest image (kernel, initramfs, rootfs); cached by content.
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

/// Build (or reuse) the image for the default spec plus `args`.
pub fn build(home: &Path, args: &BuildArgs) -> anyhow::Result<Image> {
    let agent = find_agent(&args.agent)?;
    let mut spec = ImageSpec::new(agent);
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

pub fn run(home: &Path, cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Build(args) => {
            let img = build(home, &args)?;
            println!("{}", img.id);
        }
        ImageCmd::Ls => {
            let store = Store::new(home);
            let current = store.current().ok().map(|i| i.id);
            let images = store.list()?;
            if images.is_empty() {
                eprintln!("dough: no images yet; run `dough image build`");
            }
            println!(
                "{:<18} {:<8} {:<28} {:>9} {:>9}  PACKAGES",
                "ID", "CURRENT", "KERNEL", "ROOTFS", "INITRD"
            );
            for i in images {
                let mib = |p: &Path| {
                    std::fs::metadata(p)
                        .map(|m| format!("{}M", m.len() >> 20))
                        .unwrap_or_else(|_| "missing".into())
                };
                println!(
                    "{:<18} {:<8} {:<28} {:>9} {:>9}  {}",
                    i.id,
                    if current.as_deref() == Some(i.id.as_str()) {
                        "*"
                    } else {
                        ""
                    },
                    i.kernel_release,
                    mib(&i.rootfs),
                    mib(&i.initrd),
                    i.packages.join(",")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
