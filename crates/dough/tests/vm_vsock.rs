//! The agent's vsock transport in a real guest, on machines where
//! Firecracker cannot run: QEMU (TCG) gets a vhost-user vsock device served
//! by rust-vmm's `vhost-device-vsock`, whose host side is Firecracker's
//! hybrid vsock (guest-initiated connections to port P arrive on
//! `<uds>_P`). So the real agent, in the real image, finds a vsock device,
//! connects to CID 2 port 1024, and dough's own Firecracker-side listener
//! (`VsockListener`) and handshake serve it — the same code paths a
//! Firecracker clone uses, minus Firecracker. Then the host goes away and
//! comes back, as across a snapshot restore: the agent reconnects and is
//! welcomed afresh.
//!
//! VM tier: needs the image `scripts/test` builds and `DOUGH_VHOST_VSOCK`
//! (`scripts/test` installs vhost-device-vsock and sets it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dough_fabric::channel::VsockListener;
use dough_fabric::serial::{tail, SerialWatch};
use dough_fabric::{ExecRequest, HostChannel};
use dough_proto::{ExitStatus, READY_LINE, VSOCK_PORT};
use dough_vmm::process::wait_until;
use dough_vmm::{Memory, QemuArgs, Resolved, VmPaths};

/// Children killed (by their own handle) when the test ends, pass or fail.
struct Reap(Vec<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn vhost_device_vsock() -> PathBuf {
    let p = std::env::var_os("DOUGH_VHOST_VSOCK").map(PathBuf::from).expect(
        "DOUGH_VHOST_VSOCK is not set: run the suite with scripts/test, which installs vhost-device-vsock",
    );
    assert!(p.is_file(), "{} does not exist", p.display());
    p
}

fn accept(uds: &Path, qemu: &mut Child, serial: &Path) -> HostChannel {
    VsockListener::bind(uds, VSOCK_PORT)
        .unwrap()
        .accept(Duration::from_secs(120), &mut || {
            qemu.try_wait().unwrap().is_some()
        })
        .unwrap_or_else(|e| panic!("{e}; serial console:\n{}", tail(serial, 30)))
}

#[test]
fn vm_agent_serves_the_host_over_vsock_and_reconnects_after_the_host_leaves() {
    let img = common::current_image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let paths = VmPaths::new(d);
    let vhost_sock = d.join("vhost.sock");
    let mut kids = Reap(Vec::new());

    kids.0.push(
        Command::new(vhost_device_vsock())
            .arg("--guest-cid")
            .arg("3")
            .arg("--socket")
            .arg(&vhost_sock)
            .arg("--uds-path")
            .arg(&paths.vsock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("vhost.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || vhost_sock.exists()),
        "vhost-device-vsock never made its socket: {}",
        tail(&d.join("vhost.log"), 10)
    );

    // Listen before the guest can connect, as the Firecracker path does.
    let listener = VsockListener::bind(&paths.vsock, VSOCK_PORT).unwrap();
    let mem = d.join("mem");
    let args = QemuArgs {
        accel: Resolved::Tcg,
        mem_mib: 256,
        cpus: 1,
        kernel: img.kernel.clone(),
        initrd: img.initrd.clone(),
        rootfs: img.rootfs.clone(),
        rootfs_writable: false,
        scratch: false,
        extra_cmdline: vec![],
        tsc_khz: dough_vmm::accel::host_tsc_khz(),
        paths: paths.clone(),
        // vhost-user needs guest RAM the device process can map.
        memory: Memory::File {
            path: mem,
            shared: true,
        },
        incoming: None,
        start_paused: false,
        tap: None,
        tcg_cache_mib: None,
    };
    let mut argv = args.argv();
    argv.extend(
        [
            "-chardev".to_string(),
            format!("socket,id=vs0,path={}", vhost_sock.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vs0".into(),
        ]
        .map(Into::into),
    );
    kids.0.push(
        Command::new("qemu-system-x86_64")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&paths.vmm_log).unwrap())
            .stderr(std::fs::File::create(d.join("qemu.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let qemu = kids.0.last_mut().unwrap();
    let mut watch = SerialWatch::new(&paths.serial);
    assert!(
        wait_until(Duration::from_secs(120), || watch.saw(READY_LINE)
            || qemu.try_wait().unwrap().is_some()),
        "no ready line; serial console:\n{}",
        tail(&paths.serial, 30)
    );
    let mut ch = listener
        .accept(Duration::from_secs(120), &mut || {
            qemu.try_wait().unwrap().is_some()
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}; serial console:\n{}\nqemu:\n{}",
                tail(&paths.serial, 30),
                tail(&d.join("qemu.err"), 10)
            )
        });
    let hello = ch.handshake("vm-vsock-1", Duration::from_secs(60)).unwrap();

    // The agent chose vsock because a vsock device is bound, and it runs
    // commands as it does over virtio-serial.
    assert_eq!(
        common::sh(
            &mut ch,
            "cat /proc/1/comm; ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport | grep -c virtio; echo $IS_SANDBOX $DOUGH_VM_ID"
        ),
        "dough-agent\n1\n1 vm-vsock-1"
    );
    let big = vec![b'v'; 300 << 10];
    let mut out = Vec::new();
    let st = ch
        .exec(
            &ExecRequest {
                argv: vec!["wc".into(), "-c".into()],
                stdin: Some(big),
                ..ExecRequest::default()
            },
            &mut |_, d| out.extend_from_slice(d),
        )
        .unwrap();
    assert_eq!(st, ExitStatus::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        (300 << 10).to_string()
    );

    // The host leaves (nobody listens: the agent's reconnects are refused),
    // then a new host listens: the agent connects again and is welcomed
    // with a new identity, as after a restore.
    ch.shutdown();
    drop(ch);
    std::thread::sleep(Duration::from_millis(300));
    let mut ch = accept(&paths.vsock, qemu, &paths.serial);
    let again = ch.handshake("vm-vsock-2", Duration::from_secs(60)).unwrap();
    assert_eq!(again.boot_id, hello.boot_id, "the same guest");
    assert_eq!(common::sh(&mut ch, "echo $DOUGH_VM_ID"), "vm-vsock-2");
}
