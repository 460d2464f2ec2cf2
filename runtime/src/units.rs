//! Reading quantities given on command lines and in configuration files.

/// Parses sizes like `3G`, `512M`, `1.5GiB`, or a plain byte count.
pub fn parse_size(s: &str) -> Option<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((v * mult) as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("3G"), Some(3 << 30));
        assert_eq!(super::parse_size("512M"), Some(512 << 20));
        assert_eq!(super::parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(super::parse_size("4096"), Some(4096));
        assert_eq!(super::parse_size("3X"), None);
    }
}
