//! Resolving `--accel auto`. `/dev/kvm` existing is not enough: a nested,
//! paravirtual KVM opens fine and then boots a stock kernel so slowly that
//! it never reaches init. So `auto` boots the real image under KVM with a
//! short deadline, once per host boot and kernel, and remembers the answer.

use std::path::Path;
use std::time::Duration;

use dough_image::Image;
use dough_vmm::{Accel, Resolved};
use serde::{Deserialize, Serialize};

use crate::vm::{BootOptions, FabricError, Vm};

/// How long a KVM guest may take to become ready before KVM counts as unusable.
pub const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct ProbeRecord {
    host_boot_id: String,
    kernel_key: String,
    usable: bool,
    reason: String,
}

/// The accelerator to use, and why when it is not what was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub accel: Resolved,
    /// Set when `auto` fell back to TCG.
    pub fallback_reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("--accel kvm: {0}")]
pub struct KvmUnavailable(pub String);

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Resolve `requested` for booting `image`. `home` keeps the probe result.
pub fn choose(
    requested: Accel,
    home: &Path,
    image: &Image,
    qemu: &Path,
) -> Result<Choice, KvmUnavailable> {
    match requested {
        Accel::Tcg => Ok(Choice {
            accel: Resolved::Tcg,
            fallback_reason: None,
        }),
        Accel::Kvm => {
            dough_vmm::accel::kvm_device_usable().map_err(KvmUnavailable)?;
            Ok(Choice {
                accel: Resolved::Kvm,
                fallback_reason: None,
            })
        }
        Accel::Auto => {
            if let Err(why) = dough_vmm::accel::kvm_device_usable() {
                return Ok(Choice {
                    accel: Resolved::Tcg,
                    fallback_reason: Some(why),
                });
            }
            let record_path = home.join("kvm-probe.json");
            let boot_id = host_boot_id();
            let cached: Option<ProbeRecord> = std::fs::read(&record_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let rec = match cached {
                Some(r) if r.host_boot_id == boot_id && r.kernel_key == image.kernel_key => r,
                _ => {
                    crate::notice::notice(&format!(
                        "/dev/kvm is present; checking that it boots a guest within {}s (once per host boot)",
                        KVM_PROBE_DEADLINE.as_secs()
                    ));
                    let r = probe(home, image, qemu, boot_id);
                    if let Ok(bytes) = serde_json::to_vec(&r) {
                        let _ = std::fs::write(&record_path, bytes);
                    }
                    r
                }
            };
            Ok(if rec.usable {
                Choice {
                    accel: Resolved::Kvm,
                    fallback_reason: None,
                }
            } else {
                Choice {
                    accel: Resolved::Tcg,
                    fallback_reason: Some(rec.reason),
                }
            })
        }
    }
}

fn probe(home: &Path, image: &Image, qemu: &Path, host_boot_id: String) -> ProbeRecord {
    let opts = BootOptions {
        qemu: qemu.to_path_buf(),
        accel: Resolved::Kvm,
        deadline: KVM_PROBE_DEADLINE,
        retries: 0,
        egress: dough_net::Egress::None,
        ..BootOptions::default()
    };
    let (usable, reason) = match Vm::boot(&home.join("vms"), image, &opts) {
        Ok(vm) => {
            let _ = vm.destroy();
            (true, String::new())
        }
        Err(FabricError::BootTimeout { secs, .. }) => (
            false,
            format!("a guest under KVM did not become ready within {secs}s"),
        ),
        Err(FabricError::VmmExited { vmm_tail, .. }) => (
            false,
            format!(
                "QEMU exited under KVM: {}",
                vmm_tail.lines().last().unwrap_or("")
            ),
        ),
        Err(e) => (false, format!("a guest under KVM failed to boot: {e}")),
    };
    ProbeRecord {
        host_boot_id,
        kernel_key: image.kernel_key.clone(),
        usable,
        reason,
    }
}
