//! Host-wide facts every other module builds on, and nothing above them:
//! this process's identity, the lock that serialises network claims across
//! every dough on the host, the marker that keeps a sweep from racing a
//! spawn, and the scope a VM directory's network objects are named in.

use std::path::{Path, PathBuf};

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

/// Where the host-wide network lock lives.
pub const NET_LOCK: &str = "/run/dough/net.lock";

/// Serialises claiming network names and subnets across every dough on
/// this host (and the leftover sweep, which must not see a network that is
/// half-built or not yet recorded).
pub fn net_lock() -> Result<nix::fcntl::Flock<std::fs::File>, HostError> {
    let path = Path::new(NET_LOCK);
    let io = |source| HostError::Lock {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(io)?;
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io(std::io::Error::from(e)))
}

/// Where each scope's VM directory is noted (`<scope>` → its path), so a
/// sweep can tell a scope whose directory is gone: everything in it is
/// left over.
pub const SCOPES_DIR: &str = "/run/dough/scopes";

/// Note `vms` under its scope (call with the network lock held).
pub fn register_scope(vms: &Path) {
    let scope = net_scope(vms);
    let file = Path::new(SCOPES_DIR).join(&scope);
    if !file.exists() {
        let canon = std::fs::canonicalize(vms).unwrap_or_else(|_| vms.to_path_buf());
        let _ = std::fs::create_dir_all(SCOPES_DIR)
            .and_then(|_| std::fs::write(&file, canon.as_os_str().as_encoded_bytes()));
    }
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
