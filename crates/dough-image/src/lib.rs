//! dough's guest image pipeline.
//!
//! An image is three artifacts, each cached under its own content key in the
//! dough home directory:
//!
//! | artifact | key covers | made by |
//! |---|---|---|
//! | kernel (`vmlinux` + modules) | the kernel package's sha256 from apt's index, module list | `apt-get download`, `dpkg-deb -x`, LZ4 decompression in Rust |
//! | rootfs (`rootfs.ext4`) | suite, mirror, package list | `mmdebstrap`, `mkfs.ext4 -d` |
//! | initramfs (`initrd.cpio`) | agent binary sha256, kernel key | a newc writer in Rust |
//!
//! The image id hashes the three keys. Changing only the agent binary
//! rebuilds only the initramfs.

pub mod apt;
pub mod cache;
pub mod cpio;
pub mod kernel;
pub mod recipe;
pub mod rootfs;
pub mod tool;

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use cache::{Entry, KeyBuilder};

/// Bumped when the recipe for an artifact changes, so old cache entries are not reused.
const KERNEL_RECIPE: &str = "kernel-v1";
/// v2: the guest's resolver is its gateway's address (not the host's).
const ROOTFS_RECIPE: &str = "rootfs-v2";
const INITRD_RECIPE: &str = "initrd-v1";
const SCRATCH_RECIPE: &str = "scratch-v1";

/// Where in the initramfs the agent finds its modules and their load order.
pub const INITRD_MODULES_DIR: &str = "lib/modules";
pub const INITRD_LOAD_ORDER: &str = "lib/modules/load-order";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Apt(#[from] apt::AptError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Tool(#[from] tool::ToolError),
    #[error("agent binary {0} not found; build it with `scripts/build-agent` or pass --agent")]
    NoAgent(PathBuf),
    #[error("{path}: {what}")]
    Layout { path: PathBuf, what: String },
    #[error("image {0} not found; `dough image ls` lists the images")]
    UnknownImage(String),
    #[error("no image has been built yet; run `dough image build`")]
    NoImage,
    #[error("reading or writing the image's files failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Recipe(#[from] recipe::RecipeError),
    #[error("recipe {recipe}: {what}")]
    RecipeBuild {
        recipe: String,
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("image manifest {path}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Debian suite of the rootfs, e.g. `bookworm`.
    pub suite: String,
    /// apt mirror; `None` reads it from the machine's apt sources.
    pub mirror: Option<String>,
    /// Packages on top of minbase.
    pub packages: Vec<String>,
    /// Kernel metapackage, e.g. `linux-image-cloud-amd64`.
    pub kernel_package: String,
    /// The static guest agent binary (becomes `/init`).
    pub agent: PathBuf,
}

impl ImageSpec {
    pub fn new(agent: PathBuf) -> Self {
        ImageSpec {
            suite: "bookworm".into(),
            mirror: None,
            packages: rootfs::BASE_PACKAGES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            kernel_package: "linux-image-cloud-amd64".into(),
            agent,
        }
    }
}

/// A built image: paths to its artifacts and the keys that made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub created_unix: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub kernel_release: String,
    pub kernel_package: String,
    pub suite: String,
    pub packages: Vec<String>,
    pub kernel_key: String,
    pub rootfs_key: String,
    pub initrd_key: String,
    pub agent_sha256: String,
    /// Variables every command in the image gets (a recipe's `env`, and the
    /// variables that make its TLS clients trust the recipe's `ca`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The recipe that made this image from its base, if one did.
    #[serde(default)]
    pub recipe: Option<RecipeInfo>,
    /// Memory its clones boot with unless a command says otherwise (a
    /// recipe's `guest.mem_mib`).
    #[serde(default)]
    pub mem_mib: Option<u32>,
}

/// Where an image made from a recipe came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeInfo {
    pub name: String,
    /// The recipe's key (its content and what it names from the host).
    pub key: String,
    /// The image it was built on.
    pub base: String,
    /// The recipe file it was last built from.
    pub path: PathBuf,
    /// How long its builder VM took.
    pub build_ms: u64,
}

/// The pipeline's steps, for progress output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Kernel,
    Rootfs,
    Initramfs,
    Recipe,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Kernel => "kernel",
            Step::Rootfs => "rootfs",
            Step::Initramfs => "initramfs",
            Step::Recipe => "recipe",
        })
    }
}

/// Progress events from [`Store::build`].
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        step: Step,
        detail: String,
    },
    Cached {
        step: Step,
        key: String,
    },
    Built {
        step: Step,
        key: String,
        secs: f64,
    },
    /// The whole image was already built with these inputs.
    UpToDate {
        id: String,
    },
}

/// The dough home directory's image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

struct KernelArtifacts {
    key: String,
    release: String,
    dir: PathBuf,
}

impl Store {
    pub fn new(home: &Path) -> Self {
        Store {
            root: home.to_path_buf(),
        }
    }

    fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Build (or find in the cache) the image for `spec`. It does not become
    /// the current image: see [`Store::set_current`].
    pub fn build(
        &self,
        spec: &ImageSpec,
        progress: &mut dyn FnMut(Event),
    ) -> Result<Image, ImageError> {
        if !spec.agent.is_file() {
            return Err(ImageError::NoAgent(spec.agent.clone()));
        }
        check_static(&spec.agent)?;
        let agent_sha256 = cache::sha256_file(&spec.agent)?;
        let mirror = match &spec.mirror {
            Some(m) => m.clone(),
            None => apt::find_mirror(Path::new("/"), &spec.suite)?,
        };
        let kernel_rec = apt::resolve_kernel_package(&spec.kernel_package)?;

        let kernel_key = KeyBuilder::new(KERNEL_RECIPE)
            .str("package", &kernel_rec.package)
            .str("sha256", &kernel_rec.sha256)
            .str("modules", &kernel::GUEST_MODULES.join(","))
            .finish();
        let mut pk = spec.packages.clone();
        pk.sort();
        pk.dedup();
        let rootfs_key = KeyBuilder::new(ROOTFS_RECIPE)
            .str("suite", &spec.suite)
            .str("mirror", &mirror)
            .str("packages", &pk.join(","))
            .finish();
        let initrd_key = KeyBuilder::new(INITRD_RECIPE)
            .str("agent", &agent_sha256)
            .str("kernel", &kernel_key)
            .finish();
        let id = KeyBuilder::new("image")
            .str("kernel", &kernel_key)
            .str("rootfs", &rootfs_key)
            .str("initrd", &initrd_key)
            .finish();

        if let Ok(img) = self.get(&id) {
            if img.kernel.exists() && img.initrd.exists() && img.rootfs.exists() {
                progress(Event::UpToDate { id });
                return Ok(img);
            }
        }

        let k = self.kernel(&kernel_rec, &kernel_key, progress)?;
        let rootfs = self.rootfs(&spec.suite, &mirror, &pk, &rootfs_key, progress)?;
        let initrd = self.initramfs(&spec.agent, &k, &initrd_key, progress)?;

        let img = Image {
            id: id.clone(),
            created_unix: now_unix(),
            kernel: k.dir.join("vmlinux"),
            initrd,
            rootfs,
            kernel_release: k.release,
            kernel_package: kernel_rec.package,
            suite: spec.suite.clone(),
            packages: pk,
            kernel_key,
            rootfs_key,
            initrd_key,
            agent_sha256,
            env: Vec::new(),
            recipe: None,
            mem_mib: None,
        };
        self.save(&img)?;
        Ok(img)
    }

    fn save(&self, img: &Image) -> Result<(), ImageError> {
        std::fs::create_dir_all(self.images_dir())?;
        let path = self.images_dir().join(format!("{}.json", img.id));
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(img).map_err(|source| ImageError::Manifest {
                path: path.clone(),
                source,
            })?,
        )?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The id of the image `recipe` makes from `base`.
    pub fn recipe_image_id(base: &Image, recipe: &recipe::LoadedRecipe) -> String {
        KeyBuilder::new("recipe-image")
            .str("base", &base.id)
            .str("recipe", &recipe.key(&base.rootfs_key))
            .finish()
    }

    /// The image `recipe` makes from `base` if it is built already.
    pub fn cached_recipe_image(
        &self,
        base: &Image,
        recipe: &recipe::LoadedRecipe,
        progress: &mut dyn FnMut(Event),
    ) -> Result<Option<Image>, ImageError> {
        let id = Self::recipe_image_id(base, recipe);
        let Ok(mut img) = self.get(&id) else {
            return Ok(None);
        };
        if !(img.kernel.exists() && img.initrd.exists() && img.rootfs.exists()) {
            return Ok(None);
        }
        if img.mem_mib != recipe.recipe.guest.mem_mib {
            img.mem_mib = recipe.recipe.guest.mem_mib;
            self.save(&img)?;
        }
        progress(Event::Cached {
            step: Step::Recipe,
            key: recipe.key(&base.rootfs_key),
        });
        progress(Event::UpToDate { id });
        Ok(Some(img))
    }

    /// Build (or find in the cache) the image `recipe` makes from `base`.
    ///
    /// The host only copies the base's root filesystem (sparse) and grows it
    /// to the recipe's size; `run_in_vm` gets that copy's path and must
    /// leave the finished filesystem in it — it runs the recipe's steps in a
    /// builder VM. After that the host never parses the filesystem (a
    /// recipe's steps are arbitrary code): it is only hashed and attached to
    /// guests. `env` is what every command in the image gets.
    pub fn build_recipe(
        &self,
        base: &Image,
        recipe: &recipe::LoadedRecipe,
        env: Vec<(String, String)>,
        progress: &mut dyn FnMut(Event),
        run_in_vm: &mut dyn FnMut(&Path) -> Result<(), ImageError>,
    ) -> Result<Image, ImageError> {
        let key = recipe.key(&base.rootfs_key);
        let id = Self::recipe_image_id(base, recipe);
        if let Some(img) = self.cached_recipe_image(base, recipe, progress)? {
            return Ok(img);
        }
        let detail = || {
            format!(
                "{} on image {}: {} file(s), {} step(s) in a builder VM",
                recipe.name,
                base.id,
                recipe.files.len(),
                recipe.recipe.run.len()
            )
        };
        let t = Instant::now();
        let size = u64::from(recipe.recipe.build.size_gib) << 30;
        let dir = self.step(Step::Recipe, &key, detail, progress, |dir| {
            let rootfs = dir.join("rootfs.ext4");
            grow_copy(&base.rootfs, &rootfs, size)?;
            run_in_vm(&rootfs)
        })?;
        let img = Image {
            id: id.clone(),
            created_unix: now_unix(),
            rootfs: dir.join("rootfs.ext4"),
            rootfs_key: key.clone(),
            env,
            recipe: Some(RecipeInfo {
                name: recipe.name.clone(),
                key,
                base: base.id.clone(),
                path: std::fs::canonicalize(&recipe.path).unwrap_or(recipe.path.clone()),
                build_ms: t.elapsed().as_millis() as u64,
            }),
            mem_mib: recipe.recipe.guest.mem_mib,
            ..base.clone()
        };
        self.save(&img)?;
        Ok(img)
    }

    /// An empty scratch filesystem of `size_mib` (a sparse file; a VM's
    /// writable layer starts as a copy of it), made once per size.
    pub fn scratch_template(&self, size_mib: u64) -> Result<PathBuf, ImageError> {
        let key = KeyBuilder::new(SCRATCH_RECIPE)
            .str("size_mib", &size_mib.to_string())
            .finish();
        let entry = Entry::new(&self.cache_dir(), "scratch", &key);
        if !entry.is_complete() {
            entry.build(|dir| -> Result<(), ImageError> {
                let image = dir.join("scratch.ext4");
                std::fs::File::create(&image)?.set_len(size_mib << 20)?;
                let argv = rootfs::MkfsScratch {
                    image: &image,
                    size_mib,
                }
                .argv();
                tool::run_tool("mkfs.ext4", argv)?;
                Ok(())
            })?;
        }
        Ok(entry.dir.join("scratch.ext4"))
    }

    /// Make `id` the image commands boot when none is named.
    pub fn set_current(&self, id: &str) -> Result<(), ImageError> {
        let p = self.images_dir().join("current");
        std::fs::write(p.with_extension("tmp"), id)?;
        std::fs::rename(p.with_extension("tmp"), p)?;
        Ok(())
    }

    /// The most recently built image.
    pub fn current(&self) -> Result<Image, ImageError> {
        let id = std::fs::read_to_string(self.images_dir().join("current"))
            .map_err(|_| ImageError::NoImage)?;
        self.get(id.trim())
    }

    /// Look up an image by id (or unique id prefix).
    pub fn get(&self, id: &str) -> Result<Image, ImageError> {
        let matches: Vec<Image> = self
            .list()?
            .into_iter()
            .filter(|i| i.id.starts_with(id))
            .collect();
        match <[Image; 1]>::try_from(matches) {
            Ok([img]) => Ok(img),
            Err(_) => Err(ImageError::UnknownImage(id.to_string())),
        }
    }

    /// All images, newest first.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.images_dir()) else {
            return Ok(out);
        };
        for e in rd {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let bytes = std::fs::read(&p)?;
                let img: Image =
                    serde_json::from_slice(&bytes).map_err(|source| ImageError::Manifest {
                        path: p.clone(),
                        source,
                    })?;
                out.push(img);
            }
        }
        out.sort_by(|a, b| b.created_unix.cmp(&a.created_unix).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// One cached step: report a hit, or build the entry with `build` and
    /// report how long it took. Returns the entry's directory.
    fn step(
        &self,
        step: Step,
        key: &str,
        detail: impl FnOnce() -> String,
        progress: &mut dyn FnMut(Event),
        build: impl FnOnce(&Path) -> Result<(), ImageError>,
    ) -> Result<PathBuf, ImageError> {
        let entry = Entry::new(&self.cache_dir(), &step.to_string(), key);
        if entry.is_complete() {
            progress(Event::Cached {
                step,
                key: key.into(),
            });
        } else {
            progress(Event::Started {
                step,
                detail: detail(),
            });
            let t = Instant::now();
            entry.build(build)?;
            let secs = t.elapsed().as_secs_f64();
            progress(Event::Built {
                step,
                key: key.into(),
                secs,
            });
        }
        Ok(entry.dir)
    }

    fn kernel(
        &self,
        rec: &apt::PackageRecord,
        key: &str,
        progress: &mut dyn FnMut(Event),
    ) -> Result<KernelArtifacts, ImageError> {
        let detail = || format!("{} {}", rec.package, rec.version);
        let dir = self.step(Step::Kernel, key, detail, progress, |dir| {
            let work = dir.join("work");
            std::fs::create_dir_all(&work)?;
            let deb = apt::download(rec, &work)?;
            let x = work.join("x");
            let argv = vec![
                "-x".into(),
                deb.into_os_string(),
                x.clone().into_os_string(),
            ];
            tool::run_tool("dpkg-deb", argv)?;
            let (bz, release) = find_vmlinuz(&x.join("boot"))?;
            let bz_bytes = std::fs::read(&bz)?;
            let elf = kernel::vmlinux_from_bzimage(&bz_bytes, &bz.display().to_string())?;
            std::fs::write(dir.join("vmlinux"), elf)?;
            let modules_dir = x.join("lib/modules").join(&release);
            let mods = kernel::resolve_modules(&modules_dir, kernel::GUEST_MODULES)?;
            let mdir = dir.join("modules");
            std::fs::create_dir_all(&mdir)?;
            let mut order = String::new();
            for (name, path) in &mods {
                std::fs::copy(path, mdir.join(format!("{name}.ko")))?;
                order.push_str(name);
                order.push('\n');
            }
            std::fs::write(mdir.join("load-order"), order)?;
            std::fs::write(dir.join("release"), &release)?;
            std::fs::remove_dir_all(&work)?;
            Ok(())
        })?;
        let release = std::fs::read_to_string(dir.join("release"))?
            .trim()
            .to_string();
        Ok(KernelArtifacts {
            key: key.to_string(),
            release,
            dir,
        })
    }

    fn rootfs(
        &self,
        suite: &str,
        mirror: &str,
        packages: &[String],
        key: &str,
        progress: &mut dyn FnMut(Event),
    ) -> Result<PathBuf, ImageError> {
        let detail = || {
            format!(
                "mmdebstrap {suite} minbase + {} (from {mirror})",
                packages.join(",")
            )
        };
        let dir = self.step(Step::Rootfs, key, detail, progress, |dir| {
            let tree = dir.join("tree");
            let argv = rootfs::Mmdebstrap {
                suite,
                mirror,
                packages,
                target: &tree,
            }
            .argv();
            tool::run_tool("mmdebstrap", argv)?;
            rootfs::set_resolver(&tree)?;
            let size_mib = rootfs::image_size_mib(rootfs::tree_size(&tree)?);
            let image = dir.join("rootfs.ext4");
            let mkfs = rootfs::MkfsExt4 {
                source_dir: &tree,
                image: &image,
                size_mib,
            };
            tool::run_tool("mkfs.ext4", mkfs.argv())?;
            std::fs::remove_dir_all(&tree)?;
            Ok(())
        })?;
        Ok(dir.join("rootfs.ext4"))
    }

    fn initramfs(
        &self,
        agent: &Path,
        k: &KernelArtifacts,
        key: &str,
        progress: &mut dyn FnMut(Event),
    ) -> Result<PathBuf, ImageError> {
        let detail = || format!("agent {} + kernel {}", agent.display(), k.key);
        let dir = self.step(Step::Initramfs, key, detail, progress, |dir| {
            let f = std::fs::File::create(dir.join("initrd.cpio"))?;
            write_initramfs(std::io::BufWriter::new(f), agent, &k.dir.join("modules"))?;
            Ok(())
        })?;
        Ok(dir.join("initrd.cpio"))
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Copy the filesystem image `from` to `to` (sparse) and grow it to `size`
/// bytes. Only ever run on a filesystem dough made itself with mkfs.
pub fn grow_copy(from: &Path, to: &Path, size: u64) -> Result<(), ImageError> {
    let have = std::fs::metadata(from)?.len();
    if size < have {
        return Err(ImageError::Layout {
            path: from.to_path_buf(),
            what: format!(
                "the base root filesystem is {} MiB; a recipe's build.size_gib must be larger",
                have >> 20
            ),
        });
    }
    tool::run_tool(
        "cp",
        vec![
            "--sparse=always".into(),
            from.as_os_str().into(),
            to.as_os_str().into(),
        ],
    )?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(to)?
        .set_len(size)?;
    // resize2fs wants a freshly checked filesystem; -p repairs nothing on a
    // clean one and fails on anything it would have to ask about.
    tool::run_tool(
        "e2fsck",
        vec!["-f".into(), "-p".into(), to.as_os_str().into()],
    )?;
    tool::run_tool("resize2fs", vec!["-p".into(), to.as_os_str().into()])?;
    Ok(())
}

/// Bytes a file takes on disk (sparse files take less than their length).
pub fn allocated_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// The agent runs as PID 1 before any root filesystem exists: it must be a
/// static executable (no ELF interpreter).
pub fn check_static(agent: &Path) -> Result<(), ImageError> {
    use object::Object;
    let bytes = std::fs::read(agent)?;
    let bad = |what: &str| ImageError::Layout {
        path: agent.to_path_buf(),
        what: what.to_string(),
    };
    let file =
        object::File::parse(&*bytes).map_err(|_| bad("the agent is not an ELF executable"))?;
    if file.section_by_name(".interp").is_some() {
        return Err(bad(
            "the agent is dynamically linked; build it with scripts/build-agent (crt-static)",
        ));
    }
    Ok(())
}

/// Find `vmlinuz-<release>` in an unpacked kernel package's `boot/`.
fn find_vmlinuz(boot: &Path) -> Result<(PathBuf, String), ImageError> {
    for e in std::fs::read_dir(boot)? {
        let p = e?.path();
        if let Some(rel) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            return Ok((p.clone(), rel.to_string()));
        }
    }
    Err(ImageError::Layout {
        path: boot.to_path_buf(),
        what: "no vmlinuz-* in the kernel package".into(),
    })
}

/// Write the initramfs: the agent as `/init`, the directories it mounts on,
/// `/dev/console` (the kernel opens it for PID 1 before devtmpfs exists),
/// and the modules with their load order.
pub fn write_initramfs<W: std::io::Write>(
    out: W,
    agent: &Path,
    modules: &Path,
) -> Result<W, ImageError> {
    use cpio::Entry as E;
    let mut w = cpio::CpioWriter::new(out);
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "lib",
        INITRD_MODULES_DIR,
        "newroot",
        "lower",
        "rw",
    ] {
        w.add(d, 0o755, &E::Dir)?;
    }
    w.add("dev/console", 0o600, &E::CharDev(5, 1))?;
    w.add("dev/null", 0o666, &E::CharDev(1, 3))?;
    w.add("init", 0o755, &E::File(std::fs::read(agent)?))?;
    let order = std::fs::read_to_string(modules.join("load-order"))?;
    for name in order.lines().filter(|l| !l.is_empty()) {
        let data = std::fs::read(modules.join(format!("{name}.ko")))?;
        w.add(
            &format!("{INITRD_MODULES_DIR}/{name}.ko"),
            0o644,
            &E::File(data),
        )?;
    }
    w.add(INITRD_LOAD_ORDER, 0o644, &E::File(order.into_bytes()))?;
    Ok(w.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_has_init_console_and_modules_in_order() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        std::fs::write(&agent, b"\x7fELFagent").unwrap();
        assert!(check_static(&agent).is_err(), "not a valid ELF");
        let me = std::env::current_exe().unwrap();
        assert!(
            matches!(check_static(&me), Err(ImageError::Layout { .. })),
            "test binaries are dynamic"
        );
        let m = d.path().join("modules");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("virtio.ko"), b"v").unwrap();
        std::fs::write(m.join("virtio_blk.ko"), b"b").unwrap();
        std::fs::write(m.join("load-order"), "virtio\nvirtio_blk\n").unwrap();
        let out = write_initramfs(Vec::new(), &agent, &m).unwrap();
        let find = |needle: &[u8]| out.windows(needle.len()).position(|w| w == needle);
        assert!(find(b"init\0").is_some());
        assert!(find(b"\x7fELFagent").is_some());
        assert!(find(b"dev/console\0").is_some());
        let a = find(b"lib/modules/virtio.ko\0").unwrap();
        let b = find(b"lib/modules/virtio_blk.ko\0").unwrap();
        assert!(a < b);
        assert!(find(b"lib/modules/load-order\0").is_some());
    }

    #[test]
    fn grow_copy_makes_a_larger_sparse_clean_filesystem() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hello"), "hi").unwrap();
        let small = d.path().join("small.ext4");
        let mkfs = rootfs::MkfsExt4 {
            source_dir: &tree,
            image: &small,
            size_mib: 16,
        };
        tool::run_tool("mkfs.ext4", mkfs.argv()).unwrap();
        let big = d.path().join("big.ext4");
        grow_copy(&small, &big, 256 << 20).unwrap();
        assert_eq!(std::fs::metadata(&big).unwrap().len(), 256 << 20);
        assert!(allocated_bytes(&big).unwrap() < 64 << 20, "copied sparse");
        let info = tool::run_tool("dumpe2fs", vec!["-h".into(), big.clone().into()]).unwrap();
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (blocks, block_size) = (field("Block count:"), field("Block size:"));
        assert_eq!(
            blocks * block_size,
            256 << 20,
            "the filesystem fills the file"
        );
        let shrink = grow_copy(&big, &d.path().join("x"), 1 << 20).unwrap_err();
        assert!(shrink.to_string().contains("size_gib"), "{shrink}");
    }

    #[test]
    fn missing_agent_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path());
        let e = s
            .build(&ImageSpec::new(d.path().join("nope")), &mut |_| {})
            .unwrap_err();
        assert!(e.to_string().contains("agent binary"), "{e}");
        assert!(matches!(s.current(), Err(ImageError::NoImage)));
    }
}
