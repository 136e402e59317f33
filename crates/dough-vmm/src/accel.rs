//! Choosing the accelerator. KVM is the only isolation boundary dough
//! trusts; TCG (software emulation) works everywhere but a guest escape
//! through QEMU's emulation is a host process compromise.

use std::os::fd::AsRawFd;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when it boots guests in time, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}; expected auto, kvm or tcg"
            )),
        }
    }
}

/// What a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Resolved {
    Kvm,
    Tcg,
}

impl Resolved {
    pub fn qemu_name(self) -> &'static str {
        match self {
            Resolved::Kvm => "kvm",
            Resolved::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// The warning shown whenever a guest runs under TCG.
pub const TCG_WARNING: &str =
    "guests run under TCG (software emulation): this is NOT a security boundary; \
     use a host with working KVM to run untrusted agents";

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// Whether `/dev/kvm` can be opened and speaks the stable API (version 12).
/// This says nothing about speed: a nested, paravirtual KVM passes this
/// check and still boots guests too slowly to use, which is why `auto`
/// also needs a boot probe (see `dough-fabric`).
pub fn kvm_device_usable() -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION reads no memory; the kernel requires its
    // argument to be 0 (an omitted variadic argument would be garbage).
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0 as libc::c_ulong) };
    if v < 0 {
        return Err(format!(
            "/dev/kvm: KVM_GET_API_VERSION failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if v != 12 {
        return Err(format!("/dev/kvm reports API version {v}, expected 12"));
    }
    Ok(())
}

/// The host's TSC rate in kHz, from `/proc/cpuinfo`'s `cpu MHz`. TCG guests
/// are told this rate on their command line (`tsc_early_khz`) because
/// calibrating it against the emulated PIT hangs under host load.
pub fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&text)
}

pub fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != "cpu MHz" {
            return None;
        }
        let mhz: f64 = v.trim().parse().ok()?;
        (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_mhz() {
        assert_eq!(
            parse_cpu_mhz("processor\t: 0\ncpu MHz\t\t: 2599.998\n"),
            Some(2_599_998)
        );
        assert_eq!(parse_cpu_mhz("cpu MHz : 2100.000"), Some(2_100_000));
        assert_eq!(parse_cpu_mhz("model name : x\n"), None);
        assert_eq!(parse_cpu_mhz("cpu MHz : fast\n"), None);
    }
}
