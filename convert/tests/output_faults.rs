//! A conversion that cannot finish leaves no output: not when a write fails (a full disk,
//! emulated with a file-size limit: the write fails with EFBIG as it would with ENOSPC), not when
//! the process is killed mid-write (by that limit's SIGXFSZ, or by SIGKILL at various moments),
//! and a killed run's hidden temporary files are removed by the next conversion to the path.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe")
}

/// `moe-convert` on the fixture into `out`, with the file-size limit `fsize` (bytes) and
/// SIGXFSZ ignored (the write then fails) or not (the process is killed).
fn convert_limited(out: &Path, fsize: u64, ignore_sigxfsz: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moe-convert"));
    cmd.arg(fixture())
        .arg("-o")
        .arg(out)
        .args(["--quiet", "--type", "f32"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: fsize,
                rlim_max: fsize,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let action = if ignore_sigxfsz {
                libc::SIG_IGN
            } else {
                libc::SIG_DFL
            };
            libc::signal(libc::SIGXFSZ, action);
            Ok(())
        });
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_failed_write_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let r = convert_limited(&out, 256 << 10, true);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "the conversion cannot fit in 256 KiB");
    assert_eq!(
        r.status.code(),
        Some(1),
        "an error exit, not a crash: {err}"
    );
    assert!(
        err.contains("out.gguf") && err.contains("too large"),
        "{err}"
    );
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

#[test]
fn a_conversion_killed_mid_write_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let r = convert_limited(&out, 256 << 10, false);
    assert_eq!(r.status.signal(), Some(libc::SIGXFSZ), "{:?}", r.status);
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));

    // SIGKILL at moments from start-up to the end: the output is either absent or complete.
    for delay_ms in [0, 10, 30, 60, 100, 200] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moe-convert"))
            .arg(fixture())
            .arg("-o")
            .arg(&out)
            .args(["--quiet", "--type", "q8_0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let left = entries(dir.path());
        if out.exists() {
            assert_eq!(left, ["out.gguf"], "after {delay_ms} ms ({status:?})");
            let file = moe_runtime::gguf::GgufFile::open(&out).expect("a complete file");
            moe_runtime::model::Model::load(&file).expect("it loads");
            std::fs::remove_file(&out).unwrap();
        } else {
            assert!(
                left.is_empty(),
                "after {delay_ms} ms ({status:?}): {left:?}"
            );
        }
    }
}

#[test]
fn a_killed_run_s_temporary_files_are_removed_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    // What a killed run leaves where the file system has no O_TMPFILE, and a killed tuned
    // conversion's f32 intermediate; the pid is above any pid_max, so the process is gone.
    let stale = [".out.gguf.4999999.tmp", ".out.f32.gguf.4999999.tmp"];
    for s in stale {
        std::fs::write(dir.path().join(s), b"partial").unwrap();
    }
    // Someone else's hidden file stays.
    std::fs::write(dir.path().join(".other.gguf.4999999.tmp"), b"not ours").unwrap();
    moe_convert::convert(
        &fixture(),
        &out,
        &moe_convert::ConvertOptions::new(moe_runtime::gguf::GgmlType::F32),
        &|_, _, _| {},
    )
    .unwrap();
    assert_eq!(entries(dir.path()), [".other.gguf.4999999.tmp", "out.gguf"]);
}
