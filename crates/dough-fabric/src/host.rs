//! Host-wide facts every other module builds on, and nothing above them:
//! this process's identity, the lock that serialises network claims across
//! every dough on the host, the marker that keeps a sweep from racing a
//! spawn, and the scope a VM directory's network objects are named in.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use dough_net::linux::LinuxNet;
use dough_net::{NetError, NetOps};
use dough_vmm::ProcessId;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot take the host-wide lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Identity of this dough process.
pub fn me() -> ProcessId {
    let pid = std::process::id() as i32;
    ProcessId::of(pid).unwrap_or(ProcessId {
        pid,
        start_ticks: 0,
    })
}

/// Held (shared) by a thread from spawning a VMM until its identity is
/// recorded; `gc::reclaim_mine` takes it exclusively, so it never reads a
/// record whose VMM is running but not yet written down.
pub static SPAWNING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Where dough keeps host-wide state (the network lock, the scope
/// registry) on a real host.
pub const RUN_DIR: &str = "/run/dough";

/// The host's network as the fabric uses it — every privileged effect a
/// VM's network needs: the operations (netns, veth, TAP, addresses,
/// nftables), spawning a VMM inside a clone's namespace, and the directory
/// for host-wide network state. [`HostNet::linux`] is the real one; a test
/// gives dough-net's `FakeNet`, a spawn that enters no namespace and a
/// private directory, and the same code runs without root.
#[derive(Clone)]
pub struct HostNet {
    ops: Arc<Mutex<Box<dyn NetOps + Send>>>,
    spawn: SpawnIn,
    run_dir: PathBuf,
    /// Told `(step, done)` around every step of building a VM's network.
    observer: Option<Observer>,
    /// Starts a clone's egress gateway; without one, only `--net none`
    /// clones can be made.
    gateway: Option<GatewayLaunch>,
    /// Why there is no gateway, when that is known.
    no_gateway: Option<String>,
    /// Names every gateway answers before asking the host's resolver.
    gateway_hosts: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Extra roots gateways trust for upstreams (PEM files).
    gateway_roots: Vec<PathBuf>,
}

/// What starting one clone's gateway needs.
pub struct GatewayStart<'a> {
    /// The clone's network namespace, where its sockets are made.
    pub netns: &'a str,
    /// The VM's directory (the gateway's diagnostics go to
    /// `gateway.stderr` there; its audit log is named in the config).
    pub vm_dir: &'a Path,
    /// Its configuration as JSON, written to its standard input (it may
    /// hold secrets: never to a file).
    pub config: &'a [u8],
}

impl std::fmt::Debug for GatewayStart<'_> {
    // The configuration may hold secrets and dough's CA key: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayStart")
            .field("netns", &self.netns)
            .field("vm_dir", &self.vm_dir)
            .field(
                "config",
                &format_args!("[{} bytes, redacted]", self.config.len()),
            )
            .finish()
    }
}

/// Start a clone's gateway process (see `dough-gateway`).
pub type GatewayLaunch = Arc<dyn Fn(&GatewayStart<'_>) -> Result<Child, NetError> + Send + Sync>;

/// Most bytes a gateway process may write to any file (its audit log
/// caps itself below this).
pub const GATEWAY_FILE_MAX: u64 = 32 << 20;

/// See [`HostNet::observed`].
type Observer = Arc<Mutex<Box<dyn FnMut(&'static str, bool) + Send>>>;

/// Spawn `cmd` inside network namespace `netns` (None: the host's). The
/// outer error is entering the namespace; the inner one, the spawn.
pub type SpawnIn = fn(Option<&str>, &mut Command) -> Result<std::io::Result<Child>, NetError>;

impl std::fmt::Debug for HostNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostNet({})", self.run_dir.display())
    }
}

impl Default for HostNet {
    fn default() -> Self {
        HostNet::linux()
    }
}

impl HostNet {
    /// This host's real network (rtnetlink, nftables, `/run/dough`).
    pub fn linux() -> HostNet {
        HostNet::new(LinuxNet::default(), spawn_in_netns, RUN_DIR)
    }

    pub fn new(
        ops: impl NetOps + Send + 'static,
        spawn: SpawnIn,
        run_dir: impl Into<PathBuf>,
    ) -> HostNet {
        HostNet {
            ops: Arc::new(Mutex::new(Box::new(ops))),
            spawn,
            run_dir: run_dir.into(),
            observer: None,
            gateway: None,
            no_gateway: None,
            gateway_hosts: BTreeMap::new(),
            gateway_roots: Vec::new(),
        }
    }

    /// Give clones with egress a gateway: the program `exe` with `args`
    /// (`dough-gateway`, or `dough gateway`), started with its listening
    /// sockets already made inside the clone's netns and its configuration
    /// on standard input.
    pub fn with_gateway(self, exe: PathBuf, args: Vec<String>) -> Self {
        self.with_gateway_launch(Arc::new(move |s: &GatewayStart<'_>| {
            launch_gateway(&exe, &args, s)
        }))
    }

    /// No gateway, for `why` (said when a clone with egress is asked for).
    pub fn without_gateway(mut self, why: String) -> Self {
        self.gateway = None;
        self.no_gateway = Some(why);
        self
    }

    /// Spawn VMMs with `spawn` (a test build stops after the real one).
    pub fn with_spawn(mut self, spawn: SpawnIn) -> Self {
        self.spawn = spawn;
        self
    }

    /// Start gateways with `launch` (tests stand one in).
    pub fn with_gateway_launch(mut self, launch: GatewayLaunch) -> Self {
        self.gateway = Some(launch);
        self
    }

    /// Names the gateways answer themselves (an `/etc/hosts` of their own).
    pub fn with_gateway_hosts(mut self, hosts: BTreeMap<String, Vec<Ipv4Addr>>) -> Self {
        self.gateway_hosts = hosts;
        self
    }

    pub fn gateway_hosts(&self) -> &BTreeMap<String, Vec<Ipv4Addr>> {
        &self.gateway_hosts
    }

    /// Roots (PEM files) gateways trust for upstreams of brokered hosts,
    /// besides webpki's and the host's bundle.
    pub fn with_gateway_roots(mut self, roots: Vec<PathBuf>) -> Self {
        self.gateway_roots = roots;
        self
    }

    pub fn gateway_roots(&self) -> &[PathBuf] {
        &self.gateway_roots
    }

    /// Start a clone's gateway; an error when this host network has none.
    pub fn start_gateway(&self, s: &GatewayStart<'_>) -> Result<Child, NetError> {
        match &self.gateway {
            Some(launch) => launch(s),
            None => Err(NetError::op(
                "starting the egress gateway",
                format!(
                    "{} (only --net none is possible without one)",
                    self.no_gateway
                        .as_deref()
                        .unwrap_or("no gateway program is configured")
                ),
            )),
        }
    }

    /// Call `hook(step, false)` before and `hook(step, true)` after each
    /// step of building a VM's network (to time the steps, or to stop at
    /// one).
    pub fn observed(mut self, hook: impl FnMut(&'static str, bool) + Send + 'static) -> Self {
        self.observer = Some(Arc::new(Mutex::new(Box::new(hook))));
        self
    }

    /// Build the network `plan` describes (see `dough_net::setup`).
    pub fn setup(
        &self,
        plan: &dough_net::NetPlan,
        pool: dough_net::Ipv4Net,
    ) -> Result<(), NetError> {
        self.building(|ops| dough_net::setup(ops, plan, pool))
    }

    /// `steps` of building a network, on these operations (observed, when
    /// an observer is set: see [`HostNet::observed`]).
    pub fn building<T>(
        &self,
        steps: impl FnOnce(&mut dyn NetOps) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        let mut ops = self.ops();
        match &self.observer {
            None => steps(&mut **ops),
            Some(o) => {
                let mut o = o.lock().unwrap_or_else(|p| p.into_inner());
                let mut observed = dough_net::ops::Observed {
                    inner: &mut **ops,
                    hook: &mut **o,
                };
                steps(&mut observed)
            }
        }
    }

    /// The network operations (one caller at a time).
    pub fn ops(&self) -> MutexGuard<'_, Box<dyn NetOps + Send>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawn `cmd` inside `netns`.
    pub fn spawn_in(
        &self,
        netns: Option<&str>,
        cmd: &mut Command,
    ) -> Result<std::io::Result<Child>, NetError> {
        (self.spawn)(netns, cmd)
    }

    /// Serialise claiming network names and subnets across every dough on
    /// this host (and the leftover sweep, which must not see a network that
    /// is half-built or not yet recorded).
    pub fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, HostError> {
        let path = self.run_dir.join("net.lock");
        let io = |source| HostError::Lock {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.run_dir).map_err(io)?;
        let f = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io(std::io::Error::from(e)))
    }

    /// Where each scope's VM directory is noted (`<scope>` → its path), so
    /// a sweep can tell a scope whose directory is gone: everything in it
    /// is left over.
    pub fn scopes_dir(&self) -> PathBuf {
        self.run_dir.join("scopes")
    }

    /// Note `vms` under its scope (call with the network lock held).
    pub fn register_scope(&self, vms: &Path) {
        let dir = self.scopes_dir();
        let file = dir.join(net_scope(vms));
        if !file.exists() {
            let canon = std::fs::canonicalize(vms).unwrap_or_else(|_| vms.to_path_buf());
            let _ = std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&file, canon.as_os_str().as_encoded_bytes()));
        }
    }
}

/// The real spawn: from a thread inside the namespace, so the VMM lives
/// there and opens the clone's TAP there.
pub fn spawn_in_netns(
    netns: Option<&str>,
    cmd: &mut Command,
) -> Result<std::io::Result<Child>, NetError> {
    dough_net::linux::in_netns(netns, || Ok(cmd.spawn()))
}

/// The real gateway start: bind its sockets on the TAP's address inside
/// the clone's netns (from a thread that has joined it), then spawn `exe`
/// on the host with them as its only inherited descriptors.
fn launch_gateway(exe: &Path, args: &[String], s: &GatewayStart<'_>) -> Result<Child, NetError> {
    use dough_net::plan::{GATEWAY_TCP_PORT, GUEST_GW};
    use std::io::Write;
    let sockets = dough_net::linux::in_netns(Some(s.netns), || {
        dough_gateway::server::Sockets::bind(GUEST_GW, GATEWAY_TCP_PORT)
            .map_err(|e| NetError::io("binding the gateway's sockets in the clone's netns", e))
    })?;
    let err_path = s.vm_dir.join("gateway.stderr");
    let stderr = std::fs::File::create(&err_path)
        .map_err(|e| NetError::io(format!("creating {}", err_path.display()), e))?;
    let mut cmd = sockets.command(exe, args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(stderr);
    dough_vmm::process::cap_file_size(&mut cmd, GATEWAY_FILE_MAX);
    dough_vmm::process::inherited_nofile(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| NetError::io(format!("starting the gateway {}", exe.display()), e))?;
    // The configuration through a pipe, then closed: the gateway reads it
    // to its end before serving.
    let written = child
        .stdin
        .take()
        .map(|mut w| w.write_all(s.config))
        .unwrap_or_else(|| Err(std::io::Error::other("no pipe")));
    if let Err(e) = written {
        let _ = child.kill();
        let _ = child.wait();
        return Err(NetError::io("giving the gateway its configuration", e));
    }
    Ok(child)
}

/// A short name for a VM directory, part of its clones' netns names and
/// rule tags, so doughs with different homes never sweep each other's.
pub fn net_scope(vms: &Path) -> String {
    use sha2::Digest;
    let canon = std::fs::canonicalize(vms).unwrap_or_else(|_| vms.to_path_buf());
    let h = sha2::Sha256::digest(canon.as_os_str().as_encoded_bytes());
    hex::encode(&h[..3])
}

/// A fresh VM id: `vm-` and 8 random hex digits.
pub fn new_vm_id() -> String {
    let mut b = [0u8; 4];
    fill_random(&mut b);
    format!("vm-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// Fill `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("reading /dev/urandom");
}

/// A host network for tests: dough-net's `FakeNet` (shared, so the test
/// can look at it), spawns that enter no namespace, and a private run
/// directory. No root needed, nothing of the real host touched.
#[cfg(test)]
pub(crate) fn fake_host_net() -> (
    tempfile::TempDir,
    Arc<Mutex<dough_net::ops::FakeNet>>,
    HostNet,
) {
    fn spawn_here(
        _netns: Option<&str>,
        cmd: &mut Command,
    ) -> Result<std::io::Result<Child>, NetError> {
        Ok(cmd.spawn())
    }
    let run = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Mutex::new(dough_net::ops::FakeNet::default()));
    // A stand-in gateway: a sleep whose argv[0] is its VM directory, so a
    // test can find it.
    // Each start is noted in `gateways` in the run directory.
    let noted = run.path().join("gateways");
    let net = HostNet::new(fake.clone(), spawn_here, run.path()).with_gateway_launch(Arc::new(
        move |s: &GatewayStart<'_>| {
            use std::io::Write;
            let mut f = std::fs::File::options()
                .create(true)
                .append(true)
                .open(&noted)
                .map_err(|e| NetError::io("fake gateway", e))?;
            let _ = writeln!(f, "{}", s.vm_dir.display());
            use std::os::unix::process::CommandExt;
            Command::new("sleep")
                .arg0(s.vm_dir)
                .arg("3600")
                .spawn()
                .map_err(|e| NetError::io("fake gateway", e))
        },
    ));
    (run, fake, net)
}
