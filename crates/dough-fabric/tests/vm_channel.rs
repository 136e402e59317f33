//! VM tier: the channel to a real guest agent — handshake effects (clock,
//! entropy, identity), concurrent requests, and reconnection.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dough_fabric::{BootOptions, ExecRequest, Vm};
use dough_image::Store;
use dough_proto::{ExitStatus, Stream};

fn image_and_home() -> (dough_image::Image, tempfile::TempDir) {
    let home = PathBuf::from(
        std::env::var_os("DOUGH_HOME")
            .expect("DOUGH_HOME is not set: run the suite with scripts/test"),
    );
    let img = Store::new(&home)
        .current()
        .expect("no guest image: run scripts/test first");
    (img, tempfile::tempdir().unwrap())
}

fn boot() -> (Vm, tempfile::TempDir) {
    let (img, vms) = image_and_home();
    let vm = Vm::boot(vms.path(), &img, &BootOptions::default()).expect("boot");
    (vm, vms)
}

fn sh(vm: &mut Vm, script: &str) -> (ExitStatus, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let st = vm
        .exec(&req, &mut |s, d| match s {
            Stream::Stdout => out.extend_from_slice(d),
            Stream::Stderr => err.extend_from_slice(d),
        })
        .expect("exec");
    (
        st,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

#[test]
fn vm_welcome_sets_clock_entropy_and_identity() {
    let (mut vm, _vms) = boot();
    let (st, out, _) = sh(
        &mut vm,
        "date +%s; echo $DOUGH_VM_ID; cat /proc/sys/kernel/random/boot_id",
    );
    assert_eq!(st, ExitStatus::Exited(0));
    let lines: Vec<&str> = out.lines().collect();
    let guest: i64 = lines[0].parse().unwrap();
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest - host).abs() <= 2,
        "guest clock {guest} vs host {host}"
    );
    assert_eq!(lines[1], vm.id);
    assert_eq!(lines[2], vm.hello.boot_id);
    // The agent reports failures on the console: clock and RNG seeding worked.
    let console = std::fs::read_to_string(&vm.paths.serial).unwrap();
    assert!(console.contains(dough_proto::READY_LINE), "{console}");
    assert!(
        !console.contains("dough-agent:"),
        "agent complained on the console:\n{console}"
    );
    vm.destroy().unwrap();
}

#[test]
fn vm_reconnect_gets_a_fresh_handshake_and_large_output_streams() {
    let (mut vm, vms) = boot();
    let dir = vm.paths.dir.clone();
    let (st, out, _) = sh(&mut vm, "head -c 300000 /dev/zero | tr '\\0' x");
    assert_eq!(st, ExitStatus::Exited(0));
    assert_eq!(
        out.len(),
        300_000,
        "output larger than one frame arrives whole"
    );
    let before = vm.hello.boot_id.clone();
    // Reconnect several times in quick succession: the guest may not even
    // notice the host was gone, and must still greet each new connection.
    for i in 0..5 {
        let hello = vm.reconnect(Duration::from_secs(30)).expect("reconnect");
        assert_eq!(hello.boot_id, before, "same guest, new connection");
        let (st, out, _) = sh(&mut vm, &format!("echo again {i}"));
        assert_eq!((st, out), (ExitStatus::Exited(0), format!("again {i}\n")));
    }
    let pid = vm.pid();
    vm.destroy().unwrap();
    assert!(!dir.exists(), "teardown removes the VM directory");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
            let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            st.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        }
    );
    assert_eq!(std::fs::read_dir(vms.path()).unwrap().count(), 0);
}

#[test]
fn vm_two_guests_get_distinct_randomness() {
    let (mut a, _va) = boot();
    let (mut b, _vb) = boot();
    let read = |vm: &mut Vm| sh(vm, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").1;
    let (ra, rb) = (read(&mut a), read(&mut b));
    assert_eq!(ra.len(), 64);
    assert_ne!(ra, rb);
    assert_ne!(a.id, b.id);
}
