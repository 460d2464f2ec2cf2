//! `moe-convert --pregate FILE.onnx`: the GGUF names its pre-gating router
//! (`moe_edge.pregate.onnx`, relative to the GGUF) and the network lands beside it, so
//! `moe-run --predictor pregate` finds it without `--pregate`.

use std::path::Path;

use moe_convert::{convert, ConvertOptions, PregateSidecar};
use moe_runtime::gguf::{GgmlType, GgufFile};
use moe_runtime::moe::predictor::{find_sidecar, PREGATE_KEY};

fn convert_with_pregate(hf: &Path, out: &Path, onnx: &Path, ty: GgmlType) -> std::path::PathBuf {
    let side = PregateSidecar::new(out, onnx).unwrap();
    let opts = ConvertOptions {
        extra_metadata: vec![side.metadata()],
        ..ConvertOptions::new(ty)
    };
    convert(hf, out, &opts, &|_, _, _| {}).unwrap();
    side.install().unwrap().to_path_buf()
}

#[test]
fn the_gguf_names_its_sidecar_and_the_runtime_finds_it() {
    let hf = moe_e2e::fixtures_dir().join("qwen3_moe");
    let elsewhere = tempfile::tempdir().unwrap();
    // The converter does not parse the network; any bytes show where they end up.
    let onnx = elsewhere.path().join("router.onnx");
    std::fs::write(&onnx, b"not really onnx").unwrap();

    // From another folder: copied beside the output under the output's stem.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model-q8.gguf");
    let at = convert_with_pregate(&hf, &out, &onnx, GgmlType::Q8_0);
    assert_eq!(at, dir.path().join("model-q8.pregate.onnx"));
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(
        file.header().get(PREGATE_KEY).and_then(|v| v.as_str()),
        Some("model-q8.pregate.onnx")
    );
    let found = find_sidecar(&out, file.header()).unwrap();
    assert_eq!(std::fs::read(found).unwrap(), b"not really onnx");

    // Already beside the output under its own name: referenced as is, not copied.
    let own = dir.path().join("custom-name.onnx");
    std::fs::write(&own, b"beside").unwrap();
    let out2 = dir.path().join("second.gguf");
    let at = convert_with_pregate(&hf, &out2, &own, GgmlType::F32);
    assert_eq!(at, own);
    assert!(!dir.path().join("second.pregate.onnx").exists());
    let file = GgufFile::open(&out2).unwrap();
    assert_eq!(find_sidecar(&out2, file.header()).unwrap(), own);

    assert!(PregateSidecar::new(&out, &dir.path().join("missing.onnx")).is_err());
}

/// The real pre-gating router of models/small-moe, referenced from a fresh conversion: moe-run
/// `--predictor pregate` loads it (natively, whatever the build) without `--pregate`.
#[test]
fn moe_run_finds_the_referenced_pregate_router() {
    use std::ffi::OsString;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let hf = root.join("models/small-moe/hf");
    let dir = tempfile::tempdir().unwrap();
    // Under a name the sidecar convention would not find: only the key leads to it.
    let onnx = dir.path().join("router-v1.onnx");
    std::fs::copy(
        root.join("models/small-moe/small-moe-q8_0.pregate.onnx"),
        &onnx,
    )
    .unwrap();
    let out = dir.path().join("renamed.gguf");
    convert_with_pregate(&hf, &out, &onnx, GgmlType::Q8_0);
    assert!(!dir.path().join("renamed.pregate.onnx").exists());
    let argv: Vec<OsString> = [
        "moe-run",
        "-m",
        out.to_str().unwrap(),
        "--tokens",
        "1,2,3,4,5",
        "-n",
        "4",
        "--predictor",
        "pregate",
        "--stats",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let (mut o, mut e) = (Vec::new(), Vec::new());
    moe_runtime::cli::run(argv, &mut o, &mut e).unwrap_or_else(|err| panic!("moe-run: {err:#}"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o),
        String::from_utf8_lossy(&e)
    );
    assert!(
        all.contains("\"predictor\":\"pregate\""),
        "the pre-gate ran: {all}"
    );
}
