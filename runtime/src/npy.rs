//! Minimal NumPy `.npy` (format 1.0) reading and writing of little-endian float32 arrays (and
//! writing of int32 / float16 arrays of any rank, for routing traces).

use std::io::{self, Read, Write};

/// Writes `data` (row-major `[rows, cols]`) as a float32 `.npy` array.
pub fn write_f32_2d(w: impl Write, data: &[f32], rows: usize, cols: usize) -> io::Result<()> {
    assert_eq!(data.len(), rows * cols);
    write_f32(w, data, &[rows, cols])
}

/// Writes `data` (row-major, `shape`) as a float32 `.npy` array.
pub fn write_f32(w: impl Write, data: &[f32], shape: &[usize]) -> io::Result<()> {
    write_raw(
        w,
        "<f4",
        shape,
        data.len(),
        data.iter().map(|v| v.to_le_bytes()),
    )
}

/// Writes `data` (row-major, `shape`) as a float16 `.npy` array (halves the size of large
/// probability dumps).
pub fn write_f16(w: impl Write, data: &[f32], shape: &[usize]) -> io::Result<()> {
    let it = data.iter().map(|&v| half::f16::from_f32(v).to_le_bytes());
    write_raw(w, "<f2", shape, data.len(), it)
}

/// Writes `data` (row-major, `shape`) as an int32 `.npy` array.
pub fn write_i32(w: impl Write, data: &[i32], shape: &[usize]) -> io::Result<()> {
    write_raw(
        w,
        "<i4",
        shape,
        data.len(),
        data.iter().map(|v| v.to_le_bytes()),
    )
}

fn write_raw<const N: usize>(
    mut w: impl Write,
    descr: &str,
    shape: &[usize],
    len: usize,
    values: impl Iterator<Item = [u8; N]>,
) -> io::Result<()> {
    if shape.iter().product::<usize>() != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} values do not fill the shape {shape:?}"),
        ));
    }
    let dims: String = match shape {
        [one] => format!("{one},"),
        _ => shape
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut buf = Vec::with_capacity(len * N);
    for v in values {
        buf.extend_from_slice(&v);
    }
    w.write_all(&buf)
}

/// Reads a version 1 `.npy` header of a C-order array of `descr` (e.g. `<f4`): its shape.
fn read_header(r: &mut impl Read, descr: &str) -> io::Result<Vec<usize>> {
    let mut magic = [0u8; 10];
    r.read_exact(&mut magic)?;
    if &magic[..6] != b"\x93NUMPY" || magic[6] != 1 {
        return Err(bad("not a version 1 .npy file"));
    }
    let hlen = u16::from_le_bytes([magic[8], magic[9]]) as usize;
    let mut header = vec![0u8; hlen];
    r.read_exact(&mut header)?;
    let header = String::from_utf8(header).map_err(|_| bad("header is not UTF-8"))?;
    if !header.contains(&format!("'descr': '{descr}'"))
        || !header.contains("'fortran_order': False")
    {
        return Err(bad(&format!(
            "only C-order arrays of type {descr} are supported here"
        )));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect()
}

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

/// The array's little-endian 4-byte values after the header, as many as the shape says.
fn read_words(mut r: impl Read, dims: &[usize]) -> io::Result<Vec<[u8; 4]>> {
    let len = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| bad("shape too large"))?;
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes)?;
    if bytes.len() != len {
        return Err(bad("data size does not match the shape"));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| [b[0], b[1], b[2], b[3]])
        .collect())
}

/// Reads a 2-D little-endian float32 C-order `.npy` array: `(data, rows, cols)`.
pub fn read_f32_2d(mut r: impl Read) -> io::Result<(Vec<f32>, usize, usize)> {
    let dims = read_header(&mut r, "<f4")?;
    let (rows, cols) = match dims[..] {
        [r, c] => (r, c),
        [c] => (1, c),
        _ => return Err(bad("expected a 1-D or 2-D array")),
    };
    let data = read_words(r, &dims)?
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    Ok((data, rows, cols))
}

/// Reads a little-endian int32 C-order `.npy` array of any rank: `(data, shape)`.
pub fn read_i32(mut r: impl Read) -> io::Result<(Vec<i32>, Vec<usize>)> {
    let dims = read_header(&mut r, "<i4")?;
    let data = read_words(r, &dims)?
        .into_iter()
        .map(i32::from_le_bytes)
        .collect();
    Ok((data, dims))
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

    #[test]
    fn int_round_trip() {
        let mut buf = Vec::new();
        super::write_i32(&mut buf, &[1, -2, 3, 4, 5, 6], &[1, 2, 3]).unwrap();
        let back = super::read_i32(&buf[..]).unwrap();
        assert_eq!(back, (vec![1, -2, 3, 4, 5, 6], vec![1, 2, 3]));
        assert!(super::read_f32_2d(&buf[..]).is_err());
        assert!(super::read_i32(&buf[..buf.len() - 4]).is_err());
    }

    #[test]
    fn int_header_any_rank() {
        let mut buf = Vec::new();
        super::write_i32(&mut buf, &[1, 2, 3, 4, 5, 6], &[1, 2, 3]).unwrap();
        assert_eq!(buf.len() % 64, 24);
        let text = String::from_utf8_lossy(&buf[10..buf.len() - 24]);
        assert!(text.contains("'descr': '<i4'") && text.contains("'shape': (1, 2, 3)"));
        let mut buf = Vec::new();
        super::write_i32(&mut buf, &[7], &[1]).unwrap();
        assert!(String::from_utf8_lossy(&buf).contains("'shape': (1,)"));
        assert!(super::write_i32(&mut buf, &[7], &[2]).is_err());
    }
}
