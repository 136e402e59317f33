//! Shared set-up for the VM-tier tests: they boot real guests from the image
//! that `scripts/test` builds once into `$DOUGH_HOME`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The dough home holding the built image. Missing is a failure, not a skip:
/// these tests are the point of the suite.
pub fn shared_home() -> PathBuf {
    let home = std::env::var_os("DOUGH_HOME")
        .map(PathBuf::from)
        .expect("DOUGH_HOME is not set: run the suite with scripts/test, which builds the guest image first");
    assert!(
        home.join("images/current").exists(),
        "no guest image in {}: run scripts/test (or `dough image build`) first",
        home.display()
    );
    home
}

/// A private dough home that shares the built image's artifacts (manifests
/// point at absolute paths in the shared cache) but has its own VM state.
pub fn private_home() -> tempfile::TempDir {
    let shared = shared_home();
    let d = tempfile::tempdir().unwrap();
    let images = d.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for e in std::fs::read_dir(shared.join("images")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), images.join(e.file_name())).unwrap();
    }
    d
}

pub fn dough(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dough"));
    c.env("DOUGH_HOME", home).env_remove("RUST_LOG");
    c
}

pub fn run(home: &Path, args: &[&str]) -> Output {
    dough(home).args(args).output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Entries of `home/vms` (VM state directories).
pub fn vm_dirs(home: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(home.join("vms")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => vec![],
    }
}
