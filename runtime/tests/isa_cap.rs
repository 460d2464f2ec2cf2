//! `MOE_EDGE_ISA` caps the kernel table at an instruction-set level, and `moe-run --version`
//! names the table that runs. Each case is its own process, since the table is chosen once.

use std::process::Command;

use moe_runtime::tensor::kernels::{self, ISA_LEVELS};

fn version_with(isa: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .arg("--version")
        .env_remove("MOE_EDGE_SCALAR")
        .env("MOE_EDGE_ISA", isa)
        .output()
        .expect("moe-run runs")
}

#[test]
fn every_level_caps_the_table_the_binary_runs() {
    for isa in ISA_LEVELS {
        let want = kernels::capped(isa).expect("a listed level");
        // The table is at or below the cap, and the cap changes what the binary runs.
        let rank = |l: &str| ISA_LEVELS.iter().position(|x| *x == l).unwrap();
        assert!(rank(want.isa) >= rank(isa), "{isa} picked {}", want.name);
        let out = version_with(isa);
        assert!(out.status.success(), "{isa}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.trim_end()
                .ends_with(&format!("(kernels: {})", want.name)),
            "MOE_EDGE_ISA={isa}: {text}"
        );
    }
    assert_eq!(kernels::capped("scalar").unwrap().name, "scalar");
}

/// On an x86 CPU with AVX2 (AVX-512 or not), `avx2` gives exactly the AVX2+FMA+F16C table.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_cap_is_what_an_avx2_only_cpu_picks() {
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c"))
    {
        return;
    }
    let k = kernels::capped("avx2").unwrap();
    assert_eq!(k.name, "x86_64 avx2+fma+f16c");
    assert!(kernels::tables().iter().any(|t| std::ptr::eq(*t, k)));
}

#[test]
fn an_unknown_level_is_refused() {
    assert!(kernels::capped("sse9").is_none());
    let out = version_with("sse9");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MOE_EDGE_ISA=sse9"));
}
