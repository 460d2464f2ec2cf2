//! Sizes as users write them on command lines and in configuration files.

/// A size that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a size such as 4096, 512K, 1.5G or 3GiB")]
pub struct SizeError(pub String);

/// Parses `4096`, `512K`, `512M`, `1.5G`, `3GiB`, `2 gb`: a positive number of bytes with an
/// optional binary multiple (K, M, G or T, case-insensitive, optionally followed by `B` or `iB`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(err()),
    };
    let bytes = match num.parse::<u64>() {
        Ok(n) => n.checked_mul(mult).ok_or_else(err)?,
        Err(_) => {
            let v: f64 = num.parse().map_err(|_| err())?;
            let b = v * mult as f64;
            if !b.is_finite() || b >= u64::MAX as f64 {
                return Err(err());
            }
            b as u64
        }
    };
    if bytes == 0 {
        return Err(err());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 64 kb "), Ok(64 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "3X",
            "0",
            "12Q",
            "lots",
            "",
            "G",
            "1.2.3M",
            "-1",
            "99999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
