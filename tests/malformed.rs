//! Malformed inputs give clear errors, never panics or out-of-bounds reads.

use std::path::Path;

use moe_e2e::Fixture;
use moe_runtime::gguf::{GgmlType, GgufFile, GgufHeader};
use moe_runtime::model::Model;

fn converted_bytes() -> Vec<u8> {
    let conv = Fixture::load("qwen3_moe").convert(GgmlType::Q8_0);
    std::fs::read(&conv.path).unwrap()
}

fn err_text(bytes: &[u8]) -> String {
    match GgufHeader::parse(bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Position right after the first occurrence of `needle`.
fn after(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + needle.len())
        .expect("needle present")
}

#[test]
fn truncated_file_fails_at_every_cut() {
    let bytes = converted_bytes();
    let header = GgufHeader::parse(&bytes).unwrap();
    let data_start = header.data_start;
    // Every cut inside the header, and a spread of cuts through the tensor data.
    let mut cuts: Vec<usize> = (0..data_start).step_by(3).collect();
    cuts.extend((data_start..bytes.len()).step_by(bytes.len() / 50 + 1));
    for cut in cuts {
        assert!(
            GgufHeader::parse(&bytes[..cut]).is_err(),
            "a file cut at {cut} of {} bytes parsed",
            bytes.len()
        );
    }
    // Through the file API too, with a message a user can act on.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() - 5000]).unwrap();
    let e = GgufFile::open(&path)
        .err()
        .expect("truncated file must not open")
        .to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn wrong_magic() {
    let mut bytes = converted_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    assert!(err_text(&bytes).contains("not a GGUF file"));
}

#[test]
fn tensor_offset_past_the_end() {
    let mut bytes = converted_bytes();
    // Tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    let name = b"output_norm.weight";
    let p = after(&bytes, name);
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    let off_at = p + 4 + 8 * n_dims + 4;
    bytes[off_at..off_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = err_text(&bytes);
    assert!(
        e.contains("output_norm.weight") && e.contains("past the end"),
        "{e}"
    );
    // A misaligned offset is rejected too.
    bytes[off_at..off_at + 8].copy_from_slice(&4u64.to_le_bytes());
    assert!(err_text(&bytes).contains("not a multiple of the alignment"));
}

#[test]
fn unknown_tensor_type_and_absurd_counts() {
    let bytes = converted_bytes();
    let p = after(&bytes, b"output_norm.weight");
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    let mut b = bytes.clone();
    let ty_at = p + 4 + 8 * n_dims;
    b[ty_at..ty_at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert!(err_text(&b).contains("ggml type id 77"));
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    assert!(err_text(&b).contains("impossible"));
}

#[test]
fn metadata_contradicting_tensor_shapes() {
    let mut bytes = converted_bytes();
    // qwen3moe.embedding_length: key, then type (u32), then the u32 value.
    let p = after(&bytes, b"qwen3moe.embedding_length") + 4;
    bytes[p..p + 4].copy_from_slice(&65u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let e = Model::load(&file).err().expect("must not load").to_string();
    assert!(e.contains("shape"), "{e}");
}

/// Random byte corruption of the header never panics, whether it parses or not.
#[test]
fn random_header_corruption_never_panics() {
    let bytes = converted_bytes();
    let data_start = GgufHeader::parse(&bytes).unwrap().data_start;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.gguf");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..1 + round % 4 {
            let at = (next() as usize) % data_start;
            b[at] = next() as u8;
        }
        if GgufHeader::parse(&b).is_ok() {
            std::fs::write(&path, &b).unwrap();
            if let Ok(file) = GgufFile::open(&path) {
                let _ = Model::load(&file).map(|m| m.hp.n_layer);
            }
        }
    }
}

fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(moe_e2e::fixtures_dir().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn convert_err(dir: &Path) -> String {
    let out = dir.join("out.gguf");
    let e = moe_convert::convert(
        dir,
        &out,
        &moe_convert::ConvertOptions::new(GgmlType::Q8_0),
        &|_, _, _| {},
    )
    .expect_err("conversion must fail")
    .to_string();
    // Nothing half-written is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".gguf"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    e
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(cfg.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

#[test]
fn config_missing_field_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", tmp.path());
    edit_config(tmp.path(), |c| {
        c.remove("hidden_size");
    });
    let e = convert_err(tmp.path());
    assert!(e.contains("`hidden_size` is missing"), "{e}");
}

#[test]
fn unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", tmp.path());
    edit_config(tmp.path(), |c| {
        c.insert("model_type".into(), "llama".into());
    });
    let e = convert_err(tmp.path());
    assert!(
        e.contains("`llama`") && e.contains("does not support"),
        "{e}"
    );
}

#[test]
fn config_contradicting_tensor_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", tmp.path());
    edit_config(tmp.path(), |c| {
        c.insert("moe_intermediate_size".into(), 48.into());
        c.insert("num_attention_heads".into(), 8.into());
    });
    let e = convert_err(tmp.path());
    assert!(e.contains("has shape"), "{e}");
}

#[test]
fn safetensors_header_lying_about_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // Claim that the last tensor in the file is 4 KiB longer than the data present.
    let last = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(k, _)| k.clone())
        .unwrap();
    let end = header[&last]["data_offsets"][1].as_u64().unwrap();
    header[&last]["data_offsets"][1] = (end + 4096).into();
    let new_header = serde_json::to_vec(&header).unwrap();
    let mut out = (new_header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&new_header);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    let e = convert_err(tmp.path());
    assert!(e.contains("invalid safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", tmp.path());
    edit_config(tmp.path(), |c| {
        c.insert("num_hidden_layers".into(), 4.into());
    });
    let e = convert_err(tmp.path());
    assert!(e.contains("model.layers.3."), "{e}");
}
