//! The importance matrix `moe-convert --calib` collects, against llama-imatrix's on the same
//! model and text (`tests/fixtures/llama_imatrix/small-moe.imatrix.gguf`, from
//! scripts/fixtures/make_llama_imatrix.py: small-moe's f32 file, `calib.txt`, windows of 64):
//! the same chunk keys, equal counts for every tensor (so the same tokens were routed to every
//! expert), sums within float rounding. Then what the collected matrix does: a `--calib` q4_k_m
//! file is the file `--imatrix` of the written matrix makes (the round trip), differs from one
//! without it, keeps each kept expert's bytes when experts are pruned (its rows of the matrix go
//! with it), and a file given with `--imatrix` wins over the collected matrix.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moe_convert::{convert, CalibOptions, ConvertOptions, Mix, PruneSpec, Summary, Tuning};
use moe_runtime::gguf::GgufFile;

const WINDOW: usize = 64;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/llama_imatrix")
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// An imatrix file's keys and, per tensor, (sums, counts).
struct ImatrixFile {
    chunk_count: u64,
    chunk_size: u64,
    entries: HashMap<String, (Vec<f32>, Vec<f32>)>,
}

fn read_imatrix(path: &Path) -> ImatrixFile {
    let file = GgufFile::open(path).unwrap();
    let h = file.header();
    let key = |k: &str| h.get(k).and_then(|v| v.as_u64()).unwrap();
    let mut entries = HashMap::new();
    for t in h.tensors() {
        if let Some(name) = t.name.strip_suffix(".in_sum2") {
            let counts = h.tensor(&format!("{name}.counts")).unwrap();
            let sums = f32s(file.tensor_bytes(t));
            entries.insert(name.to_string(), (sums, f32s(file.tensor_bytes(counts))));
        }
    }
    ImatrixFile {
        chunk_count: key("imatrix.chunk_count"),
        chunk_size: key("imatrix.chunk_size"),
        entries,
    }
}

fn calib() -> CalibOptions {
    CalibOptions {
        text: fixture().join("calib.txt"),
        max_tokens: 8192,
        kl_tokens: 0,
        window: WINDOW,
    }
}

/// small-moe as `mix`, calibrated (and pruned) when `tuning`, with `imatrix` given.
fn small_moe(
    out: &Path,
    mix: &str,
    tuning: Option<Tuning>,
    imatrix: Option<PathBuf>,
    imatrix_out: Option<PathBuf>,
) -> Summary {
    let mix = Mix::from_name(mix).unwrap();
    let opts = ConvertOptions {
        mix: Some(mix),
        imatrix,
        imatrix_out,
        tuning,
        ..ConvertOptions::new(mix.default_type())
    };
    convert(
        &root().join("models/small-moe/hf"),
        out,
        &opts,
        &|_, _, _| {},
    )
    .unwrap_or_else(|e| panic!("{}: {e}", out.display()))
}

fn calibrated() -> Option<Tuning> {
    Some(Tuning {
        calib: Some(calib()),
        ..Default::default()
    })
}

/// Every tensor's bytes by name.
fn tensors(path: &Path) -> HashMap<String, (String, Vec<u8>)> {
    let file = GgufFile::open(path).unwrap();
    file.header()
        .tensors()
        .iter()
        .map(|t| {
            let bytes = file.tensor_bytes(t).to_vec();
            (t.name.clone(), (t.ty.name().to_string(), bytes))
        })
        .collect()
}

#[test]
fn collected_imatrix_matches_llama_imatrix() {
    let dir = tempfile::tempdir().unwrap();
    let ours_path = dir.path().join("ours.imatrix.gguf");
    let out = dir.path().join("m.gguf");
    small_moe(&out, "q4_k_m", calibrated(), None, Some(ours_path.clone()));
    let ours = read_imatrix(&ours_path);
    let theirs = read_imatrix(&fixture().join("small-moe.imatrix.gguf"));
    assert_eq!(
        (ours.chunk_count, ours.chunk_size),
        (theirs.chunk_count, theirs.chunk_size)
    );
    // Per layer: attn_q/k/v/output, ffn_gate_inp and the three expert tensors.
    assert_eq!(ours.entries.len(), 6 * 8);
    let mut worst = 0f32;
    for (name, (sums, counts)) in &theirs.entries {
        let (our_sums, our_counts) = ours
            .entries
            .get(name)
            .unwrap_or_else(|| panic!("{name} was not collected"));
        assert_eq!(our_counts, counts, "{name}: counts");
        assert_eq!(our_sums.len(), sums.len(), "{name}: columns");
        assert!(counts.iter().any(|&c| c > 0.0), "{name}: no input summed");
        // Relative to each matrix's (expert's) largest sum: the two runtimes' activations differ
        // by float rounding only.
        let cols = sums.len() / counts.len();
        for (a, b) in our_sums.chunks(cols).zip(sums.chunks(cols)) {
            let scale = b.iter().fold(f32::MIN_POSITIVE, |m, &v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs() / scale);
            }
        }
    }
    assert!(worst < 1e-5, "sums differ by {worst} of the largest");
    eprintln!(
        "{} tensors as llama-imatrix: counts equal, sums within {worst:.2e}",
        theirs.entries.len()
    );
}

#[test]
fn calib_q4_k_m_is_the_file_its_written_imatrix_makes() {
    let dir = tempfile::tempdir().unwrap();
    let (imatrix, calibrated_path) = (
        dir.path().join("ours.imatrix.gguf"),
        dir.path().join("calib.gguf"),
    );
    small_moe(
        &calibrated_path,
        "q4_k_m",
        calibrated(),
        None,
        Some(imatrix.clone()),
    );
    let round_trip = dir.path().join("round-trip.gguf");
    small_moe(&round_trip, "q4_k_m", None, Some(imatrix), None);
    let plain = dir.path().join("plain.gguf");
    small_moe(&plain, "q4_k_m", None, None, None);
    let (a, b, c) = (
        tensors(&calibrated_path),
        tensors(&round_trip),
        tensors(&plain),
    );
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(Some(t), b.get(name), "{name}");
    }
    let weighted = a.iter().filter(|(n, t)| c.get(*n) != Some(t)).count();
    assert!(
        weighted > 20,
        "only {weighted} tensors changed with the importance matrix"
    );
}

#[test]
fn pruned_experts_take_their_imatrix_rows_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.gguf");
    small_moe(&full, "q4_k_m", calibrated(), None, None);
    let pruned = dir.path().join("pruned.gguf");
    let tuning = Tuning {
        calib: Some(calib()),
        prune: Some(PruneSpec::parse("top:12").unwrap()),
        ..Default::default()
    };
    let summary = small_moe(&pruned, "q4_k_m", Some(tuning), None, None);
    let kept = summary.tuned.unwrap().kept;
    let (a, b) = (tensors(&full), tensors(&pruned));
    let mut slabs = 0;
    for (l, ks) in kept.iter().enumerate() {
        for which in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
            let name = format!("blk.{l}.{which}.weight");
            let ((ta, ba), (tb, bb)) = (&a[&name], &b[&name]);
            assert_eq!(ta, tb, "{name}: type");
            let (per_a, per_b) = (ba.len() / 24, bb.len() / ks.len());
            assert_eq!(per_a, per_b);
            for (i, &e) in ks.iter().enumerate() {
                assert!(
                    ba[e * per_a..(e + 1) * per_a] == bb[i * per_b..(i + 1) * per_b],
                    "{name}: expert {e} (kept as {i}) encoded differently"
                );
                slabs += 1;
            }
        }
    }
    assert_eq!(slabs, 6 * 3 * 12);
}

#[test]
fn a_given_imatrix_wins_over_the_collected_one() {
    let dir = tempfile::tempdir().unwrap();
    let given = fixture().join("small-moe.imatrix.gguf");
    let with_calib = dir.path().join("with-calib.gguf");
    small_moe(
        &with_calib,
        "q4_k_m",
        calibrated(),
        Some(given.clone()),
        None,
    );
    let plain = dir.path().join("plain.gguf");
    small_moe(&plain, "q4_k_m", None, Some(given), None);
    let (a, b) = (tensors(&with_calib), tensors(&plain));
    for (name, t) in &a {
        assert_eq!(Some(t), b.get(name), "{name}");
    }
}

#[test]
fn imatrix_options_are_refused_where_they_mean_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let hf = root().join("models/small-moe/hf");
    // Nothing collects a matrix without calibration text.
    let opts = ConvertOptions {
        imatrix_out: Some(dir.path().join("im.gguf")),
        ..ConvertOptions::new(moe_runtime::gguf::GgmlType::Q8_0)
    };
    let err = convert(&hf, &out, &opts, &|_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("--calib"), "{err}");
    // A text without one whole window has no matrix to weight a mix with.
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "It is a truth universally acknowledged.").unwrap();
    let tuning = Tuning {
        calib: Some(CalibOptions {
            text: short,
            ..calib()
        }),
        ..Default::default()
    };
    let mix = Mix::from_name("q4_k_m").unwrap();
    let opts = ConvertOptions {
        mix: Some(mix),
        tuning: Some(tuning),
        ..ConvertOptions::new(mix.default_type())
    };
    let err = convert(&hf, &out, &opts, &|_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("no whole window"), "{err}");
    assert!(!out.exists());
}
