//! Minimal NumPy `.npy` (format 1.0) reading and writing of 2-D little-endian float32 arrays.

use std::io::{self, Read, Write};

/// Writes `data` (row-major `[rows, cols]`) as a float32 `.npy` array.
pub fn write_f32_2d(mut w: impl Write, data: &[f32], rows: usize, cols: usize) -> io::Result<()> {
    assert_eq!(data.len(), rows * cols);
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut buf = Vec::with_capacity(data.len() * 4);
    for v in data {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    w.write_all(&buf)
}

/// Reads a 2-D little-endian float32 C-order `.npy` array: `(data, rows, cols)`.
pub fn read_f32_2d(mut r: impl Read) -> io::Result<(Vec<f32>, usize, usize)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut magic = [0u8; 10];
    r.read_exact(&mut magic)?;
    if &magic[..6] != b"\x93NUMPY" || magic[6] != 1 {
        return Err(bad("not a version 1 .npy file"));
    }
    let hlen = u16::from_le_bytes([magic[8], magic[9]]) as usize;
    let mut header = vec![0u8; hlen];
    r.read_exact(&mut header)?;
    let header = String::from_utf8(header).map_err(|_| bad("header is not UTF-8"))?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(bad(
            "only little-endian float32 C-order arrays are supported",
        ));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let (rows, cols) = match dims[..] {
        [r, c] => (r, c),
        [c] => (1, c),
        _ => return Err(bad("expected a 1-D or 2-D array")),
    };
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes)?;
    if bytes.len() != rows * cols * 4 {
        return Err(bad("data size does not match the shape"));
    }
    let data = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((data, rows, cols))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let mut buf = Vec::new();
        super::write_f32_2d(&mut buf, &data, 2, 3).unwrap();
        assert_eq!((buf.len() - data.len() * 4) % 64, 0);
        let (back, r, c) = super::read_f32_2d(&buf[..]).unwrap();
        assert_eq!((back, r, c), (data, 2, 3));
    }
}
