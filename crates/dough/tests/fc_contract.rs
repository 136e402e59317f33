//! Contract tier, through the CLI: `dough bake --backend firecracker`
//! against a **real** `firecracker` (`DOUGH_FIRECRACKER`). Every API call
//! dough makes must be accepted: the bake either succeeds (where KVM runs
//! Firecracker guests) or fails only where the guest cannot boot — with
//! Firecracker's log, the serial tail and the reason — never on the API.
//! Where KVM cannot run the guest this takes two boot attempts (~35 s each
//! on our machines, until the vCPU dies).
//!
//! `#[ignore]`d (our CI has no firecracker binary); `scripts/test` runs it
//! when `DOUGH_FIRECRACKER` names one. By hand:
//! `DOUGH_FIRECRACKER=/path cargo nextest run -p dough --test fc_contract --run-ignored only`.

mod common;

use common::{dough, private_home_own_snapshots, text, vm_dirs};

#[test]
#[ignore = "contract tier: needs DOUGH_FIRECRACKER=<a real firecracker binary>"]
fn bake_against_real_firecracker_never_fails_on_the_api() {
    // dough's rule: DOUGH_FIRECRACKER, else `firecracker` on PATH.
    let fc = std::env::var_os("DOUGH_FIRECRACKER")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("firecracker"))
                .find(|p| p.is_file())
        })
        .expect("contract tier: needs DOUGH_FIRECRACKER=<a real firecracker binary>");
    let fc = fc.to_str().unwrap();
    let home = private_home_own_snapshots();
    let out = dough(home.path())
        .args(["bake", "--backend", "firecracker", "--firecracker", fc])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    if !out.status.success() {
        for api_failure in ["Firecracker API", "Firecracker refused", "did not appear"] {
            assert!(
                !err.contains(api_failure),
                "the bake failed on the API:\n{err}"
            );
        }
        // Past configuration and InstanceStart (an API failure reads
        // differently, above); the error shows the serial tail.
        assert!(
            err.contains("last serial console lines"),
            "the failure shows the serial tail:\n{err}"
        );
        assert!(
            err.contains("exited during boot") || err.contains("did not print its ready line"),
            "{err}"
        );
        if err.contains("KVM_EXIT_INTERNAL_ERROR") {
            assert!(
                err.contains("this host's KVM cannot run the guest"),
                "{err}"
            );
        }
    }
    assert!(vm_dirs(home.path()).is_empty(), "nothing left behind");
}
