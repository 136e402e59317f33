//! Firecracker's API bodies, written from the facts of its published
//! swagger (1.16; field names and required fields checked against it).
//! Optional fields are left out of the JSON when unset.

use serde::{Deserialize, Serialize};

/// `PUT /boot-source` (pre-boot). Required: `kernel_image_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `huge_pages` of [`MachineConfiguration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    Transparent,
    #[serde(rename = "2M")]
    TwoM,
}

/// `PUT /machine-config` (pre-boot). Required: `vcpu_count`, `mem_size_mib`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    /// 1 or an even number, at most 32.
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

/// `PUT /drives/{drive_id}` (pre-boot). Required: `drive_id`,
/// `is_root_device`; `path_on_host` and `is_read_only` are required for a
/// virtio-block drive, which is all dough uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    pub path_on_host: String,
    pub is_read_only: bool,
}

/// `PUT /network-interfaces/{iface_id}` (pre-boot). Required: `iface_id`,
/// `host_dev_name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /vsock` (pre-boot). Required: `guest_cid` (≥ 3), `uds_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

/// `PUT /entropy` (pre-boot). Nothing required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {}

/// `level` of [`Logger`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// `PUT /logger`. Nothing required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
}

/// `PUT /metrics`. Required: `metrics_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub metrics_path: String,
}

/// `action_type` of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PUT /actions`. Required: `action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `state` of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `PATCH /vm`. Required: `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub state: VmState,
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/create` (post-boot, paused). Required: `snapshot_path`,
/// `mem_file_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    pub snapshot_type: SnapshotType,
    pub snapshot_path: String,
    pub mem_file_path: String,
}

/// `backend_type` of [`MemoryBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendType {
    File,
    Uffd,
}

/// Required: `backend_type`, `backend_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: BackendType,
    pub backend_path: String,
}

/// Required: `iface_id`, `host_dev_name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// Required: `uds_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `PUT /snapshot/load` (only on a fresh process: nothing but logger and
/// metrics configured before it). Required: `snapshot_path`, and exactly
/// one of `mem_backend`/`mem_file_path` (dough always sends `mem_backend`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// `GET /version` (200). Required: `firecracker_version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// Firecracker's error body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    #[serde(default)]
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, to_value};

    #[test]
    fn bodies_use_the_swagger_field_names() {
        assert_eq!(
            to_value(BootSource {
                kernel_image_path: "/k".into(),
                initrd_path: Some("/i".into()),
                boot_args: Some("console=ttyS0".into()),
            })
            .unwrap(),
            json!({"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "console=ttyS0"})
        );
        assert_eq!(
            to_value(BootSource {
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: None
            })
            .unwrap(),
            json!({"kernel_image_path": "/k"}),
            "optional fields are left out"
        );
        assert_eq!(
            to_value(MachineConfiguration {
                vcpu_count: 2,
                mem_size_mib: 256,
                smt: Some(false),
                huge_pages: Some(HugePages::TwoM),
                track_dirty_pages: None,
            })
            .unwrap(),
            json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "huge_pages": "2M"})
        );
        assert_eq!(
            to_value(Drive {
                drive_id: "rootfs".into(),
                is_root_device: true,
                path_on_host: "/r.ext4".into(),
                is_read_only: true
            })
            .unwrap(),
            json!({"drive_id": "rootfs", "is_root_device": true, "path_on_host": "/r.ext4", "is_read_only": true})
        );
        assert_eq!(
            to_value(NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "tap0".into(),
                guest_mac: Some("52:54:00:d0:06:01".into())
            })
            .unwrap(),
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "52:54:00:d0:06:01"})
        );
        assert_eq!(
            to_value(Vsock {
                guest_cid: 3,
                uds_path: "/v.sock".into()
            })
            .unwrap(),
            json!({"guest_cid": 3, "uds_path": "/v.sock"})
        );
        assert_eq!(to_value(EntropyDevice {}).unwrap(), json!({}));
        assert_eq!(
            to_value(Logger {
                log_path: Some("/l".into()),
                level: Some(LogLevel::Warning),
                show_level: Some(true),
                show_log_origin: None
            })
            .unwrap(),
            json!({"log_path": "/l", "level": "Warning", "show_level": true})
        );
        assert_eq!(
            to_value(Metrics {
                metrics_path: "/m".into()
            })
            .unwrap(),
            json!({"metrics_path": "/m"})
        );
        assert_eq!(
            to_value(InstanceActionInfo {
                action_type: ActionType::InstanceStart
            })
            .unwrap(),
            json!({"action_type": "InstanceStart"})
        );
        assert_eq!(
            to_value(Vm {
                state: VmState::Paused
            })
            .unwrap(),
            json!({"state": "Paused"})
        );
        assert_eq!(
            to_value(SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                snapshot_path: "/s".into(),
                mem_file_path: "/mem".into()
            })
            .unwrap(),
            json!({"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/mem"})
        );
        assert_eq!(
            to_value(SnapshotLoadParams {
                snapshot_path: "/s".into(),
                mem_backend: MemoryBackend {
                    backend_type: BackendType::File,
                    backend_path: "/mem".into()
                },
                resume_vm: Some(true),
                network_overrides: vec![NetworkOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: "tap0".into()
                }],
                vsock_override: Some(VsockOverride {
                    uds_path: "/c/v.sock".into()
                }),
            })
            .unwrap(),
            json!({
                "snapshot_path": "/s",
                "mem_backend": {"backend_type": "File", "backend_path": "/mem"},
                "resume_vm": true,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
                "vsock_override": {"uds_path": "/c/v.sock"}
            })
        );
        let v: FirecrackerVersion =
            serde_json::from_value(json!({"firecracker_version": "1.16.0"})).unwrap();
        assert_eq!(v.firecracker_version, "1.16.0");
        let e: ApiError = serde_json::from_str("{\"fault_message\": \"bad\"}").unwrap();
        assert_eq!(e.fault_message, "bad");
    }
}
