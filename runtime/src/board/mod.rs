//! Board profiles: what a board is (targets/profiles/*.toml, compiled in) and the run-time
//! defaults derived from it — threads, memory budget, expert-cache eviction, lookahead, direct
//! I/O, I/O threads, KV cache type. `--target-profile NAME|auto|none` in moe-run and moed
//! applies them; explicit flags still win.
//!
//! Storage figures are not repeated here: a profile names FlashProfile entries
//! (runtime/src/moe/cache/flash.rs), the one source of bandwidth and latency.

pub mod detect;

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use crate::model::KvType;
use crate::moe::cache::flash::FlashProfile;
use crate::moe::cache::Eviction;
pub use detect::Host;

/// The profile files, compiled in so that a binary copied to a board needs nothing else.
const BUILTIN: &[(&str, &str)] = &[
    ("pi5", include_str!("../../../targets/profiles/pi5.toml")),
    ("pi4", include_str!("../../../targets/profiles/pi4.toml")),
    (
        "zero2w",
        include_str!("../../../targets/profiles/zero2w.toml"),
    ),
    (
        "generic-aarch64",
        include_str!("../../../targets/profiles/generic-aarch64.toml"),
    ),
    (
        "x86_64",
        include_str!("../../../targets/profiles/x86_64.toml"),
    ),
];

#[derive(Debug, Error)]
pub enum BoardError {
    #[error(
        "unknown target profile `{0}`: use auto, none, one of {names}, or a path to a .toml file",
        names = builtin_names().join(", ")
    )]
    Unknown(String),
    #[error("target profile {0}: {1}")]
    Invalid(String, String),
    #[error("reading target profile {0}: {1}")]
    Io(String, std::io::Error),
}

/// One board, as its profile file describes it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    pub name: String,
    pub description: String,
    /// "aarch64" or "x86_64": the architecture a binary for this board is built for.
    pub arch: String,
    pub rust_target: String,
    /// `-C target-cpu` for a build that runs on this board only.
    pub target_cpu: String,
    /// MIDR part number ("CPU part" in /proc/cpuinfo) that identifies the board's CPU.
    #[serde(default)]
    pub cpu_part: Option<u16>,
    pub cpu_features: Vec<String>,
    pub cores: usize,
    /// RAM variants in GiB, and the one assumed when the profile is used on another machine.
    pub ram_gib: Vec<f64>,
    pub default_ram_gib: f64,
    pub dram_gb_per_s: f64,
    /// FlashProfile names, fastest first; the first is assumed unless detected otherwise.
    pub storage: Vec<String>,
    /// Values that override the derived ones.
    #[serde(default)]
    pub defaults: Overrides,
}

/// Per-profile overrides of derived defaults (the `[defaults]` table).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    pub threads: Option<usize>,
    /// A size like "3G".
    pub mem_budget: Option<String>,
    pub eviction: Option<String>,
    pub lookahead: Option<usize>,
    pub direct_io: Option<bool>,
    pub io_threads: Option<usize>,
    pub kv_type: Option<String>,
}

impl BoardProfile {
    pub fn parse(origin: &str, text: &str) -> Result<Self, BoardError> {
        let p: BoardProfile =
            toml::from_str(text).map_err(|e| BoardError::Invalid(origin.into(), e.to_string()))?;
        let bad = |msg: String| Err(BoardError::Invalid(origin.into(), msg));
        if p.cores == 0 {
            return bad("cores must be at least 1".into());
        }
        if p.default_ram_gib <= 0.0 || p.ram_gib.iter().any(|&g| g <= 0.0) {
            return bad("RAM sizes must be positive".into());
        }
        if p.storage.is_empty() {
            return bad("storage lists no device".into());
        }
        for s in &p.storage {
            if FlashProfile::by_name(s).is_none() {
                return bad(format!(
                    "storage `{s}` is not a FlashProfile (runtime/src/moe/cache/flash.rs): {}",
                    flash_names().join(", ")
                ));
            }
        }
        let o = &p.defaults;
        if let Some(e) = &o.eviction {
            if Eviction::from_name(e).is_none() {
                return bad(format!("defaults.eviction `{e}` is not lru, lfu or belady"));
            }
        }
        if let Some(k) = &o.kv_type {
            if KvType::from_name(k).is_none() {
                return bad(format!("defaults.kv_type `{k}` is not f16 or f32"));
            }
        }
        if let Some(b) = &o.mem_budget {
            if crate::units::parse_size(b).is_err() {
                return bad(format!("defaults.mem_budget `{b}` is not a size like 3G"));
            }
        }
        if o.threads == Some(0) || o.io_threads == Some(0) {
            return bad("thread counts must be at least 1".into());
        }
        Ok(p)
    }

    /// A built-in profile by name, or a profile file by path (anything with a `/` or ending
    /// in `.toml`).
    pub fn load(name: &str) -> Result<Self, BoardError> {
        if name.contains('/') || name.ends_with(".toml") {
            let text = std::fs::read_to_string(name).map_err(|e| BoardError::Io(name.into(), e))?;
            return Self::parse(name, &text);
        }
        let (_, text) = BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| BoardError::Unknown(name.into()))?;
        Self::parse(name, text)
    }

    pub fn builtin() -> Vec<Self> {
        BUILTIN
            .iter()
            .map(|(n, t)| Self::parse(n, t).expect("built-in profiles are checked by tests"))
            .collect()
    }

    /// The profile for a detected machine: the board whose CPU part matches, else the generic
    /// profile of the architecture.
    pub fn for_host(host: &Host) -> Self {
        let all = Self::builtin();
        if let Some(part) = host.cpu.part {
            if let Some(p) = all.iter().find(|p| p.cpu_part == Some(part)) {
                return p.clone();
            }
        }
        let generic = if host.arch == "x86_64" {
            "x86_64"
        } else {
            "generic-aarch64"
        };
        all.into_iter()
            .find(|p| p.name == generic)
            .expect("built-in generic profiles exist")
    }

    /// Whether `host` is (a machine like) this board, so its detected sizes apply.
    fn describes(&self, host: &Host) -> bool {
        match self.cpu_part {
            Some(part) => host.cpu.part == Some(part),
            None => host.arch == self.arch,
        }
    }
}

pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

fn flash_names() -> Vec<&'static str> {
    FlashProfile::PROFILES.iter().map(|p| p.name).collect()
}

/// The machine the defaults are derived for: detected when the profile describes this host,
/// otherwise the profile's nominal figures (capped by what this host really has, so emulating
/// a 16 GiB board in an 8 GiB container does not plan for memory that is not there).
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    pub cores: usize,
    pub ram: u64,
    pub storage: FlashProfile,
    /// Whether `ram`/`cores` were measured here rather than taken from the profile.
    pub detected: bool,
    /// Whether the model's device was named or detected, rather than assumed (the profile's
    /// first storage entry).
    pub storage_known: bool,
}

const GIB: f64 = (1u64 << 30) as f64;

impl Machine {
    /// `storage_hint`: the FlashProfile name of the model file's device, if known.
    pub fn new(profile: &BoardProfile, host: &Host, storage_hint: Option<&str>) -> Self {
        let nominal_ram = (profile.default_ram_gib * GIB) as u64;
        let detected = profile.describes(host);
        let (cores, ram) = if detected {
            (host.cores, host.usable_ram().unwrap_or(nominal_ram))
        } else {
            (
                profile.cores.min(host.cores.max(1)),
                host.usable_ram()
                    .map_or(nominal_ram, |r| r.min(nominal_ram)),
            )
        };
        // A detected device that the board lists wins; "microsd" on a board whose SD host is
        // slower resolves to the board's own SD entry.
        let listed = |name: &str| profile.storage.iter().find(|s| s.starts_with(name));
        let known = storage_hint.and_then(listed);
        let storage = known.unwrap_or(&profile.storage[0]);
        Machine {
            cores,
            ram,
            storage: FlashProfile::by_name(storage).expect("profile storage checked by parse"),
            detected,
            storage_known: known.is_some(),
        }
    }
}

/// Run-time settings derived from a board; every field is a default that a flag overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct Defaults {
    pub threads: usize,
    /// Total memory budget (weights resident + KV cache + expert cache + runtime overhead).
    /// Streaming only starts when the model does not fit in it.
    pub mem_budget: usize,
    pub eviction: Eviction,
    pub lookahead: usize,
    pub direct_io: bool,
    pub io_threads: usize,
    pub kv_type: KvType,
}

impl Defaults {
    /// The rules, each with its reason:
    /// - threads: every core (decode is bandwidth bound; all cores saturate DRAM soonest).
    /// - memory budget: usable RAM (physical, capped by the cgroup limit) minus a reserve for
    ///   the OS and other processes of 1/8 of it, at least 128 MiB and at most 1 GiB.
    /// - eviction: belady (layer-aware; the best measured policy at 25% and 50% caches,
    ///   docs/BENCHMARKS.md).
    /// - lookahead: 0. Behind the microSD emulator its speculative reads cost more than they
    ///   hid; no board has been measured where it pays yet (docs/BENCHMARKS.md).
    /// - token-level predictor (`--predictor`): none on every board. The pre-gating router's
    ///   wrong guesses queue ahead of needed reads on microSD, it gains little on NVMe, and it
    ///   needs a trained sidecar (docs/BENCHMARKS.md); models routed by a decoupled router load
    ///   their exact experts ahead without any predictor.
    /// - direct I/O: on, so streamed experts do not also fill the page cache (which would count
    ///   against a cgroup limit and evict the resident weights' pages).
    /// - I/O threads: one per request the device serves at once: microSD 1 (one command at a
    ///   time), USB SSD 2 (UAS queues a few), NVMe 4.
    /// - KV cache: f16 (half of f32's memory; logits within tolerance, tested).
    pub fn derive(profile: &BoardProfile, m: &Machine) -> Self {
        let reserve = (m.ram / 8).clamp(128 << 20, 1 << 30);
        let io_threads = match m.storage.name {
            "nvme" => 4,
            "usb-ssd" => 2,
            _ => 1,
        };
        let mut d = Defaults {
            threads: m.cores.max(1),
            // Capped for 32-bit builds, where the address space is the limit anyway.
            mem_budget: m.ram.saturating_sub(reserve).min(usize::MAX as u64) as usize,
            eviction: Eviction::Belady,
            lookahead: 0,
            direct_io: true,
            io_threads,
            kv_type: KvType::F16,
        };
        let o = &profile.defaults;
        if let Some(t) = o.threads {
            d.threads = t;
        }
        if let Some(b) = o
            .mem_budget
            .as_deref()
            .and_then(|b| crate::units::parse_size(b).ok())
        {
            d.mem_budget = b as usize;
        }
        if let Some(e) = o.eviction.as_deref().and_then(Eviction::from_name) {
            d.eviction = e;
        }
        if let Some(l) = o.lookahead {
            d.lookahead = l;
        }
        if let Some(x) = o.direct_io {
            d.direct_io = x;
        }
        if let Some(t) = o.io_threads {
            d.io_threads = t;
        }
        if let Some(k) = o.kv_type.as_deref().and_then(KvType::from_name) {
            d.kv_type = k;
        }
        d
    }
}

/// What `--target-profile` resolved to.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub profile: BoardProfile,
    pub machine: Machine,
    pub defaults: Defaults,
}

/// Resolves `--target-profile`: `auto` (detect), `none` (no board defaults), a built-in name
/// or a file path, optionally with `:STORAGE` (e.g. `pi4:usb-ssd`) to name the model's device;
/// otherwise it is detected from `model`'s block device.
pub fn resolve(
    spec: &str,
    host: &Host,
    model: Option<&Path>,
) -> Result<Option<Resolved>, BoardError> {
    let (name, storage) = match spec.split_once(':') {
        Some((n, s)) => (n, Some(s)),
        None => (spec, None),
    };
    let profile = match name {
        "none" => return Ok(None),
        "auto" => BoardProfile::for_host(host),
        n => BoardProfile::load(n)?,
    };
    if let Some(s) = storage {
        if !profile.storage.iter().any(|p| p == s) {
            return Err(BoardError::Invalid(
                profile.name.clone(),
                format!(
                    "storage `{s}` is not one of this board's: {}",
                    profile.storage.join(", ")
                ),
            ));
        }
    }
    let hint = storage.or_else(|| model.and_then(detect::storage_of));
    let machine = Machine::new(&profile, host, hint);
    let defaults = Defaults::derive(&profile, &machine);
    Ok(Some(Resolved {
        profile,
        machine,
        defaults,
    }))
}

/// The start-up line's CPU part, e.g. `cpu: cortex-a76 x4 (neon+dotprod+fp16), kernels:
/// aarch64 neon+dotprod`.
pub fn cpu_summary(host: &Host) -> String {
    let features = if host.features.is_empty() {
        "no SIMD".to_string()
    } else {
        host.features.join("+")
    };
    format!(
        "cpu: {} x{} ({}), kernels: {}",
        host.cpu_name(),
        host.cores,
        features,
        crate::tensor::kernels::best().name
    )
}

/// `7.6 GiB` or `512 MiB`.
pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{} MiB", b >> 20)
    }
}

/// The start-up line without the expert-cache part, e.g. `cpu: cortex-a76 x4 (neon+dotprod),
/// kernels: aarch64 neon+dotprod, ram: 7.6 GiB, profile: pi5 (nvme)`.
pub fn summary(host: &Host, resolved: Option<&Resolved>) -> String {
    let ram = host
        .usable_ram()
        .map_or_else(|| "unknown".to_string(), human_bytes);
    let mut s = format!("{}, ram: {ram}", cpu_summary(host));
    match resolved {
        Some(r) => {
            let m = &r.machine;
            s += &format!(
                ", profile: {} ({}{}{})",
                r.profile.name,
                m.storage.name,
                if m.storage_known { "" } else { " assumed" },
                if m.detected {
                    String::new()
                } else {
                    format!(", nominal x{} {}", m.cores, human_bytes(m.ram))
                }
            );
        }
        None => s += ", profile: none",
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use detect::CpuInfo;

    fn host(cpuinfo: &str, arch: &'static str, cores: usize, ram_gib: f64) -> Host {
        Host {
            arch,
            cpu: CpuInfo::parse(cpuinfo),
            features: vec![],
            cores,
            mem_total: Some((ram_gib * GIB) as u64),
            cgroup_limit: None,
        }
    }
    const PI5: &str = include_str!("../../../targets/cpuinfo/pi5.txt");
    const PI4: &str = include_str!("../../../targets/cpuinfo/pi4.txt");
    const ZERO2W: &str = include_str!("../../../targets/cpuinfo/zero2w.txt");
    const RK3588: &str = include_str!("../../../targets/cpuinfo/rk3588.txt");
    const XEON: &str = include_str!("../../../targets/cpuinfo/x86_64-xeon.txt");

    #[test]
    fn builtin_profiles_parse_and_name_real_storage() {
        let all = BoardProfile::builtin();
        assert_eq!(all.len(), BUILTIN.len());
        for (p, (name, _)) in all.iter().zip(BUILTIN) {
            assert_eq!(&p.name, name, "file name and `name` agree");
            assert!(p.ram_gib.contains(&p.default_ram_gib), "{name}");
        }
        let pi5 = BoardProfile::load("pi5").unwrap();
        assert_eq!(pi5.cpu_part, Some(0xd0b));
        assert_eq!(pi5.ram_gib, [4.0, 8.0, 16.0]);
        assert!(pi5.cpu_features.iter().any(|f| f == "dotprod"));
        let pi4 = BoardProfile::load("pi4").unwrap();
        assert!(!pi4.cpu_features.iter().any(|f| f == "dotprod"));
    }

    #[test]
    fn bad_profiles_are_refused_with_reasons() {
        let good = include_str!("../../../targets/profiles/pi4.toml");
        let err = |text: &str| BoardProfile::parse("t", text).unwrap_err().to_string();
        assert!(err(&good.replace("\"usb-ssd\"", "\"floppy\"")).contains("floppy"));
        assert!(err(&good.replace("cores = 4", "cores = 0")).contains("cores"));
        assert!(err(&format!("{good}\nbogus = 1\n")).contains("bogus"));
        assert!(err(&format!("{good}\n[defaults]\neviction = \"fifo\"\n")).contains("fifo"));
        assert!(matches!(
            BoardProfile::load("pi6"),
            Err(BoardError::Unknown(_))
        ));
        assert!(BoardProfile::load("pi6")
            .unwrap_err()
            .to_string()
            .contains("pi5, pi4"));
    }

    #[test]
    fn auto_picks_the_board_from_the_cpu_part() {
        let pick = |h: &Host| BoardProfile::for_host(h).name;
        assert_eq!(pick(&host(PI5, "aarch64", 4, 7.9)), "pi5");
        assert_eq!(pick(&host(PI4, "aarch64", 4, 3.8)), "pi4");
        assert_eq!(pick(&host(ZERO2W, "aarch64", 4, 0.42)), "zero2w");
        assert_eq!(pick(&host(RK3588, "aarch64", 8, 15.6)), "pi5");
        assert_eq!(pick(&host("", "aarch64", 2, 4.0)), "generic-aarch64");
        assert_eq!(pick(&host(XEON, "x86_64", 2, 23.5)), "x86_64");
        // An aarch64 process under qemu-user reads the x86 host's /proc/cpuinfo.
        let emulated = host(XEON, "aarch64", 2, 23.5);
        assert_eq!(pick(&emulated), "generic-aarch64");
        assert_eq!(emulated.cpu_name(), "aarch64 (core unknown)");
    }

    #[test]
    fn derivation_on_detected_boards() {
        let derive = |cpuinfo, ram, storage| {
            let h = host(cpuinfo, "aarch64", 4, ram);
            let p = BoardProfile::for_host(&h);
            let m = Machine::new(&p, &h, storage);
            (m.clone(), Defaults::derive(&p, &m))
        };
        // Pi 5 16 GB (15.8 GiB visible), model on NVMe: the 1 GiB maximum reserve, 4 I/O
        // threads; the 8 GB one keeps 1/8 back.
        let (m, d) = derive(PI5, 15.8, Some("nvme"));
        assert!(m.detected);
        assert_eq!(m.storage.name, "nvme");
        assert_eq!(d.threads, 4);
        assert_eq!(d.mem_budget as u64, (15.8 * GIB) as u64 - (1 << 30));
        let ram8 = (7.9 * GIB) as u64;
        assert_eq!(derive(PI5, 7.9, None).1.mem_budget as u64, ram8 - ram8 / 8);
        assert_eq!((d.io_threads, d.lookahead, d.direct_io), (4, 0, true));
        assert_eq!((d.eviction, d.kv_type), (Eviction::Belady, KvType::F16));
        // Pi 4 with its model on the SD card: the Pi 4's slower SD figures, one I/O thread.
        let (m, d) = derive(PI4, 3.8, Some("microsd"));
        assert_eq!(m.storage.name, "microsd-pi4");
        assert_eq!(m.storage.bytes_per_second, 45e6);
        assert_eq!(d.io_threads, 1);
        assert_eq!(
            d.mem_budget as u64,
            (3.8 * GIB) as u64 - (3.8 * GIB) as u64 / 8
        );
        // Pi 4 with no storage detected: its first (fastest) listed device.
        assert_eq!(derive(PI4, 3.8, None).0.storage.name, "usb-ssd");
        // Zero 2 W, 416 MiB visible: the 128 MiB minimum reserve.
        let (_, d) = derive(ZERO2W, 416.0 / 1024.0, None);
        assert_eq!(d.mem_budget, (416 - 128) << 20);
        assert_eq!(d.io_threads, 1);
    }

    #[test]
    fn named_profile_on_another_machine_uses_nominal_sizes_capped_by_the_host() {
        let x86 = host(XEON, "x86_64", 2, 23.5);
        let pi5 = BoardProfile::load("pi5").unwrap();
        let m = Machine::new(&pi5, &x86, None);
        assert!(!m.detected);
        // Nominal 8 GiB (less than the host's 23.5), cores capped at the host's 2.
        assert_eq!((m.cores, m.ram), (2, 8 << 30));
        let small = Host {
            cgroup_limit: Some(2 << 30),
            ..x86
        };
        assert_eq!(Machine::new(&pi5, &small, None).ram, 2 << 30);
    }

    #[test]
    fn resolve_specs() {
        let h = host(PI4, "aarch64", 4, 3.8);
        assert!(resolve("none", &h, None).unwrap().is_none());
        let r = resolve("auto", &h, None).unwrap().unwrap();
        assert_eq!(r.profile.name, "pi4");
        let r = resolve("pi4:microsd-pi4", &h, None).unwrap().unwrap();
        assert_eq!(r.machine.storage.name, "microsd-pi4");
        let e = resolve("pi4:nvme", &h, None).unwrap_err().to_string();
        assert!(e.contains("usb-ssd, microsd-pi4"), "{e}");
        assert!(resolve("nope", &h, None).is_err());
        let line = summary(&h, Some(&r));
        assert!(
            line.contains("cortex-a72 x4") && line.contains("profile: pi4 (microsd-pi4)"),
            "{line}"
        );
        let r = resolve("pi4", &host(XEON, "x86_64", 2, 23.5), None)
            .unwrap()
            .unwrap();
        let line = summary(&host(XEON, "x86_64", 2, 23.5), Some(&r));
        assert!(
            line.contains("profile: pi4 (usb-ssd assumed, nominal x2 4.0 GiB)"),
            "{line}"
        );
    }

    #[test]
    fn profile_overrides_win_over_derivation() {
        let text = format!(
            "{}\n[defaults]\nthreads = 2\nmem_budget = \"1G\"\nlookahead = 1\nkv_type = \"f32\"\n",
            include_str!("../../../targets/profiles/generic-aarch64.toml")
        );
        let p = BoardProfile::parse("t", &text).unwrap();
        let h = host("", "aarch64", 8, 16.0);
        let d = Defaults::derive(&p, &Machine::new(&p, &h, None));
        assert_eq!((d.threads, d.mem_budget, d.lookahead), (2, 1 << 30, 1));
        assert_eq!(d.kv_type, KvType::F32);
        // The zero2w file pins one I/O thread even on USB storage.
        let z = BoardProfile::load("zero2w").unwrap();
        let hz = host(ZERO2W, "aarch64", 4, 0.42);
        let m = Machine::new(&z, &hz, Some("usb-ssd"));
        assert_eq!(m.storage.name, "usb-ssd");
        assert_eq!(Defaults::derive(&z, &m).io_threads, 1);
    }
}
