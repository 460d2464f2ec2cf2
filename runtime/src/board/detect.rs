//! What machine this is: CPU (from /proc/cpuinfo and the running process's feature detection),
//! usable cores, RAM (/proc/meminfo capped by the cgroup v1 or v2 memory limit) and the kind of
//! device a file lives on. The parsers take text, so tests feed them stored samples
//! (targets/cpuinfo/).

use std::path::Path;

/// The CPU as /proc/cpuinfo describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuInfo {
    /// MIDR implementer ("CPU implementer", 0x41 = Arm Ltd).
    pub implementer: Option<u16>,
    /// MIDR part number ("CPU part"), the same for every core on a Pi. On big.LITTLE chips,
    /// the part of the last (usually biggest) cluster.
    pub part: Option<u16>,
    /// x86 "model name".
    pub model_name: Option<String>,
    /// The kernel's feature names ("Features" on ARM, "flags" on x86) of the first processor.
    pub kernel_features: Vec<String>,
    pub processors: usize,
}

impl CpuInfo {
    pub fn parse(text: &str) -> Self {
        let mut info = CpuInfo::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "processor" => info.processors += 1,
                "CPU implementer" => info.implementer = parse_hex(value),
                // Later processors overwrite earlier ones: big cores come last on big.LITTLE.
                "CPU part" => info.part = parse_hex(value),
                "model name" if info.model_name.is_none() => {
                    info.model_name = Some(value.to_string())
                }
                "Features" | "flags" if info.kernel_features.is_empty() => {
                    info.kernel_features = value.split_whitespace().map(String::from).collect()
                }
                _ => {}
            }
        }
        info
    }

    /// The core's name, e.g. "cortex-a76", for Arm Ltd cores this project targets; otherwise
    /// the model name or a generic description.
    pub fn core_name(&self) -> String {
        if let (Some(0x41), Some(part)) = (self.implementer, self.part) {
            if let Some(name) = arm_core_name(part) {
                return name.to_string();
            }
            return format!("arm part {part:#x}");
        }
        if let Some(name) = &self.model_name {
            // 32-bit ARM kernels call every core "ARMv7 Processor ..."; the part says more.
            if !name.starts_with("ARMv") {
                return name.clone();
            }
        }
        match self.part {
            Some(part) => format!("part {part:#x}"),
            None => std::env::consts::ARCH.to_string(),
        }
    }

    /// The SIMD features that matter to the kernels, in this project's names, from the kernel's
    /// list (aarch64: asimd, asimddp, asimdhp, i8mm, sve; armv7: neon; x86: avx2, fma, f16c,
    /// avx512f).
    pub fn simd_features(&self) -> Vec<&'static str> {
        let has = |f: &str| self.kernel_features.iter().any(|k| k == f);
        let table: &[(&str, &'static str)] = &[
            ("asimd", "neon"),
            ("neon", "neon"),
            ("asimddp", "dotprod"),
            ("asimdhp", "fp16"),
            ("i8mm", "i8mm"),
            ("sve", "sve"),
            ("avx2", "avx2"),
            ("fma", "fma"),
            ("f16c", "f16c"),
            ("avx512f", "avx512f"),
        ];
        let mut out: Vec<&'static str> = Vec::new();
        for (kernel_name, ours) in table {
            if has(kernel_name) && !out.contains(ours) {
                out.push(ours);
            }
        }
        out
    }
}

/// Arm Ltd part numbers (MIDR_EL1.PartNum) of the cores found on single-board computers.
fn arm_core_name(part: u16) -> Option<&'static str> {
    Some(match part {
        0xd03 => "cortex-a53",
        0xd04 => "cortex-a35",
        0xd05 => "cortex-a55",
        0xd07 => "cortex-a57",
        0xd08 => "cortex-a72",
        0xd09 => "cortex-a73",
        0xd0a => "cortex-a75",
        0xd0b => "cortex-a76",
        0xd0c => "neoverse-n1",
        0xd0d => "cortex-a77",
        0xd41 => "cortex-a78",
        0xd46 => "cortex-a510",
        0xd47 => "cortex-a710",
        0xd4d => "cortex-a715",
        0xd81 => "cortex-a720",
        _ => return None,
    })
}

fn parse_hex(s: &str) -> Option<u16> {
    let s = s.trim();
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    u16::from_str_radix(digits, 16).ok()
}

/// `MemTotal` of /proc/meminfo, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A cgroup memory limit file's value: v2 `memory.max` ("max" or bytes) or v1
/// `memory.limit_in_bytes` (a huge number, close to i64::MAX, when unlimited).
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let v: u64 = t.parse().ok()?;
    // v1 reports "no limit" as PAGE_COUNTER_MAX pages, just under i64::MAX.
    (v < 1 << 60).then_some(v)
}

/// The memory cgroups of this process from /proc/self/cgroup: (v1 memory path, v2 path).
fn parse_proc_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let (mut v1, mut v2) = (None, None);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        }
    }
    (v1, v2)
}

/// The tightest memory limit of this process's cgroup and its ancestors, if any. Inside a
/// container the cgroup's own path is often not visible under /sys/fs/cgroup (the namespace's
/// root is), so every level from the given path up to the mount point is tried.
pub fn cgroup_memory_limit() -> Option<u64> {
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let (v1, v2) = parse_proc_cgroup(&proc_cgroup);
    let mut limits = Vec::new();
    let mut walk = |root: &str, path: &str, file: &str| {
        let mut p = Path::new(root).join(path.trim_start_matches('/'));
        loop {
            if let Ok(text) = std::fs::read_to_string(p.join(file)) {
                limits.extend(parse_cgroup_limit(&text));
            }
            if p == Path::new(root) || !p.pop() {
                break;
            }
        }
    };
    if let Some(path) = v2 {
        walk("/sys/fs/cgroup", &path, "memory.max");
        walk("/sys/fs/cgroup/unified", &path, "memory.max");
    }
    if let Some(path) = v1 {
        walk("/sys/fs/cgroup/memory", &path, "memory.limit_in_bytes");
    }
    limits.into_iter().min()
}

/// The machine this process runs on.
#[derive(Clone, Debug)]
pub struct Host {
    pub arch: &'static str,
    pub cpu: CpuInfo,
    /// Features the running process can use (std's run-time detection), e.g. ["neon",
    /// "dotprod"]; these decide the kernels, whatever /proc/cpuinfo says (under qemu-user it
    /// describes the host).
    pub features: Vec<&'static str>,
    /// Cores this process may use (affinity and cgroup CPU quota included).
    pub cores: usize,
    pub mem_total: Option<u64>,
    pub cgroup_limit: Option<u64>,
}

impl Host {
    pub fn detect() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| CpuInfo::parse(&t))
            .unwrap_or_default();
        Host {
            arch: std::env::consts::ARCH,
            cpu,
            features: running_features(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|t| parse_meminfo_total(&t)),
            cgroup_limit: cgroup_memory_limit(),
        }
    }

    /// The core's name for the start-up line. Under qemu-user /proc/cpuinfo describes the
    /// host, so an x86 model name is not shown for an aarch64 process.
    pub fn cpu_name(&self) -> String {
        let x86_text = self.cpu.part.is_none() && self.cpu.model_name.is_some();
        if self.arch != "x86_64" && x86_text {
            return format!("{} (core unknown)", self.arch);
        }
        self.cpu.core_name()
    }

    /// RAM this process may use: the smaller of physical memory and the cgroup limit.
    pub fn usable_ram(&self) -> Option<u64> {
        match (self.mem_total, self.cgroup_limit) {
            (Some(m), Some(c)) => Some(m.min(c)),
            (m, c) => m.or(c),
        }
    }
}

/// The SIMD features std detects for the running process (none listed on other architectures,
/// such as 32-bit ARM, whose detection macro is not stable).
#[allow(clippy::vec_init_then_push)]
#[cfg_attr(
    not(any(target_arch = "aarch64", target_arch = "x86_64")),
    allow(unused_mut)
)]
pub fn running_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            f.push("dotprod");
        }
        if std::arch::is_aarch64_feature_detected!("fp16") {
            f.push("fp16");
        }
        if std::arch::is_aarch64_feature_detected!("i8mm") {
            f.push("i8mm");
        }
        if std::arch::is_aarch64_feature_detected!("sve") {
            f.push("sve");
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    f
}

/// The kind of device `path` is stored on, as a FlashProfile name: "microsd" for MMC/SD,
/// "nvme", "usb-ssd" for USB mass storage; None when unknown (tmpfs, overlay, SATA, ...).
pub fn storage_of(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let link = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    storage_from_sysfs_path(&link.to_string_lossy())
}

/// Classifies a resolved /sys/dev/block/MAJ:MIN path, e.g.
/// `/sys/devices/platform/.../mmc_host/mmc0/mmc0:aaaa/block/mmcblk0/mmcblk0p2`.
pub fn storage_from_sysfs_path(p: &str) -> Option<&'static str> {
    if p.contains("/mmcblk") {
        Some("microsd")
    } else if p.contains("/nvme") {
        Some("nvme")
    } else if p.contains("/usb") {
        Some("usb-ssd")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    // Named from this file rather than `super::*`, which file-level import checks read as the
    // parent `board` module: board uses detection, detection never uses board.
    use crate::board::detect::{
        parse_cgroup_limit, parse_meminfo_total, parse_proc_cgroup, storage_from_sysfs_path,
        CpuInfo,
    };

    const PI5: &str = include_str!("../../../targets/cpuinfo/pi5.txt");
    const PI4: &str = include_str!("../../../targets/cpuinfo/pi4.txt");
    const ZERO2W: &str = include_str!("../../../targets/cpuinfo/zero2w.txt");
    const PI3_ARMV7: &str = include_str!("../../../targets/cpuinfo/pi3-armv7.txt");
    const RK3588: &str = include_str!("../../../targets/cpuinfo/rk3588.txt");
    const XEON: &str = include_str!("../../../targets/cpuinfo/x86_64-xeon.txt");

    #[test]
    fn cpuinfo_samples() {
        let pi5 = CpuInfo::parse(PI5);
        assert_eq!((pi5.implementer, pi5.part), (Some(0x41), Some(0xd0b)));
        assert_eq!(pi5.processors, 4);
        assert_eq!(pi5.core_name(), "cortex-a76");
        assert_eq!(pi5.simd_features(), ["neon", "dotprod", "fp16"]);

        let pi4 = CpuInfo::parse(PI4);
        assert_eq!(pi4.core_name(), "cortex-a72");
        assert_eq!(pi4.simd_features(), ["neon"]);

        let zero = CpuInfo::parse(ZERO2W);
        assert_eq!(zero.core_name(), "cortex-a53");
        assert_eq!(zero.processors, 4);

        // 32-bit kernel: "neon" instead of "asimd", a generic model name, the same part.
        let pi3 = CpuInfo::parse(PI3_ARMV7);
        assert_eq!(pi3.core_name(), "cortex-a53");
        assert_eq!(pi3.simd_features(), ["neon"]);

        // big.LITTLE: the big cores (listed last) name the chip.
        let rk = CpuInfo::parse(RK3588);
        assert_eq!((rk.part, rk.processors), (Some(0xd0b), 8));

        let xeon = CpuInfo::parse(XEON);
        assert_eq!(xeon.part, None);
        assert_eq!(xeon.core_name(), "Intel(R) Xeon(R) Processor");
        assert_eq!(xeon.simd_features(), ["avx2", "fma", "f16c", "avx512f"]);
    }

    #[test]
    fn meminfo_and_cgroup_limits() {
        let meminfo = "MemTotal:        8245988 kB\nMemFree:         7000000 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(8245988 * 1024));
        assert_eq!(parse_meminfo_total("nothing"), None);
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("2147483648\n"), Some(2 << 30));
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit("garbage"), None);
        let v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/\n";
        assert_eq!(
            parse_proc_cgroup(v1),
            (Some("/process_api/abc".into()), Some("/".into()))
        );
        let v2 = "0::/user.slice/user-1000.slice/session-2.scope\n";
        assert_eq!(
            parse_proc_cgroup(v2),
            (
                None,
                Some("/user.slice/user-1000.slice/session-2.scope".into())
            )
        );
    }

    #[test]
    fn storage_kinds() {
        let sd = "/sys/devices/platform/axi/1000fff000.mmc/mmc_host/mmc0/mmc0:aaaa/block/mmcblk0/mmcblk0p2";
        assert_eq!(storage_from_sysfs_path(sd), Some("microsd"));
        let nvme = "/sys/devices/platform/axi/1000110000.pcie/pci0000:00/0000:00:00.0/0000:01:00.0/nvme/nvme0/nvme0n1/nvme0n1p2";
        assert_eq!(storage_from_sysfs_path(nvme), Some("nvme"));
        let usb = "/sys/devices/platform/scb/fd500000.pcie/pci0000:00/0000:00:00.0/0000:01:00.0/usb2/2-2/2-2:1.0/host0/target0:0:0/0:0:0:0/block/sda/sda2";
        assert_eq!(storage_from_sysfs_path(usb), Some("usb-ssd"));
        assert_eq!(
            storage_from_sysfs_path("/sys/devices/virtual/block/loop0"),
            None
        );
    }
}
