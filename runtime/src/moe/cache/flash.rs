//! Reading expert slabs from the model file with `pread` (optionally `O_DIRECT`), and an
//! optional flash emulator that throttles reads to a board's storage bandwidth and latency and
//! can inject faults (failed and slow reads) to test how errors travel.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const PAGE: usize = 4096;

/// Largest single read: longer extents are split so several I/O threads read them at once, but
/// flash serves large requests best (docs/BENCHMARKS.md).
pub const PIECE: usize = 1 << 20;

/// Storage speed to emulate: every read costs `latency + bytes / bandwidth`, one read at a
/// time, like a single flash device. For measurements on fast disks only; clearly emulation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashProfile {
    pub name: &'static str,
    pub bytes_per_second: f64,
    pub latency: Duration,
    /// Injected faults (none in the named profiles).
    pub faults: Faults,
}

/// Faults the emulator injects, counted over all reads of the file: every `fail_every`-th read
/// fails with an I/O error, every `slow_every`-th read takes `slow` longer (0: never). For
/// tests of error handling (`--flash-profile usb-ssd,fail-every=50,slow-every=7,slow-ms=20`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    pub fail_every: u64,
    pub slow_every: u64,
    pub slow: Duration,
}

impl FlashProfile {
    /// Figures from public measurements (the project's field notes). The one source of storage
    /// figures: board profiles (targets/profiles/*.toml) name these entries.
    pub const PROFILES: [FlashProfile; 4] = [
        // A Pi 5's SD host (SDR104).
        FlashProfile {
            name: "microsd",
            bytes_per_second: 90e6,
            latency: Duration::from_micros(500),
            faults: Faults::NONE,
        },
        // The Pi 4's, Pi 3's and Zero 2 W's SD host (DDR50): about half the Pi 5's speed.
        FlashProfile {
            name: "microsd-pi4",
            bytes_per_second: 45e6,
            latency: Duration::from_micros(500),
            faults: Faults::NONE,
        },
        FlashProfile {
            name: "usb-ssd",
            bytes_per_second: 350e6,
            latency: Duration::from_micros(150),
            faults: Faults::NONE,
        },
        FlashProfile {
            name: "nvme",
            bytes_per_second: 800e6,
            latency: Duration::from_micros(60),
            faults: Faults::NONE,
        },
    ];

    pub fn by_name(name: &str) -> Option<Self> {
        Self::PROFILES.into_iter().find(|p| p.name == name)
    }

    /// A profile name, optionally followed by injected faults: `NAME[,fail-every=N]
    /// [,slow-every=N][,slow-ms=MS]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or_default();
        let mut p = Self::by_name(name)
            .ok_or_else(|| format!("`{name}` is not microsd, microsd-pi4, usb-ssd or nvme"))?;
        for part in parts {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let n: u64 = v.parse().map_err(|_| {
                format!("`{part}`: expected fail-every=N, slow-every=N or slow-ms=MS")
            })?;
            match k {
                "fail-every" => p.faults.fail_every = n,
                "slow-every" => p.faults.slow_every = n,
                "slow-ms" => p.faults.slow = Duration::from_millis(n),
                _ => return Err(format!("`{k}` is not fail-every, slow-every or slow-ms")),
            }
        }
        Ok(p)
    }
}

impl Faults {
    pub const NONE: Faults = Faults {
        fail_every: 0,
        slow_every: 0,
        slow: Duration::ZERO,
    };
}

/// Where one slab lives in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: usize,
}

pub struct FlashReader {
    file: File,
    direct: bool,
    throttle: Option<(FlashProfile, Mutex<Instant>)>,
    /// Reads done, for injected faults.
    reads: AtomicU64,
}

impl FlashReader {
    /// Opens `path` for slab reads. With `direct`, the page cache is bypassed (`O_DIRECT`), so
    /// every read really comes from the device and does not grow the kernel's cache.
    pub fn open(path: &Path, direct: bool, throttle: Option<FlashProfile>) -> io::Result<Self> {
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true);
        if direct {
            opts.custom_flags(libc_o_direct());
        }
        let file = opts.open(path)?;
        Ok(Self {
            file,
            direct,
            throttle: throttle.map(|p| (p, Mutex::new(Instant::now()))),
            reads: AtomicU64::new(0),
        })
    }

    /// Whether reads bypass the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Room a slot needs to read `e` with page-aligned I/O: the extent plus the misalignment of
    /// its start, rounded up to whole pages.
    pub fn aligned_span(e: Extent) -> usize {
        let lead = (e.offset % PAGE as u64) as usize;
        (lead + e.len).div_ceil(PAGE) * PAGE
    }

    /// How many pieces [`read_piece`](Self::read_piece) reads `e` in.
    pub fn pieces(e: Extent) -> usize {
        Self::aligned_span(e).div_ceil(PIECE)
    }

    /// Where piece `piece` of `e` goes in a buffer laid out like [`read`](Self::read)'s (the
    /// aligned span): with `O_DIRECT` whole pages, else only the extent's own bytes.
    pub fn piece_range(&self, e: Extent, piece: usize) -> std::ops::Range<usize> {
        let span = Self::aligned_span(e);
        let (p0, p1) = (piece * PIECE, ((piece + 1) * PIECE).min(span));
        if self.direct {
            p0..p1
        } else {
            let lead = (e.offset % PAGE as u64) as usize;
            let (q0, q1) = (p0.max(lead), p1.min(lead + e.len));
            q0..q1.max(q0)
        }
    }

    /// Reads piece `piece` of extent `e` into `dst` (the buffer's
    /// [`piece_range`](Self::piece_range), page-aligned with `O_DIRECT`). Pieces of one extent
    /// may be read at the same time by different threads.
    pub fn read_piece(&self, e: Extent, piece: usize, dst: &mut [u8]) -> io::Result<()> {
        let lead = (e.offset % PAGE as u64) as usize;
        let range = self.piece_range(e, piece);
        debug_assert_eq!(dst.len(), range.len());
        let t0 = Instant::now();
        if let Some((p, _)) = &self.throttle {
            let n = self.reads.fetch_add(1, Relaxed) + 1;
            let every = |k: u64| k > 0 && n.is_multiple_of(k);
            if every(p.faults.slow_every) {
                std::thread::sleep(p.faults.slow);
            }
            if every(p.faults.fail_every) {
                return Err(io::Error::other(format!(
                    "read error injected by the flash emulator (read {n}, fail-every={})",
                    p.faults.fail_every
                )));
            }
        }
        let from = e.offset - lead as u64 + range.start as u64;
        // With O_DIRECT the aligned span may run past the end of a file whose size is not a
        // whole number of pages; only the extent itself must be there.
        let need = range.end.min(lead + e.len).saturating_sub(range.start);
        let mut done = 0;
        while done < dst.len() {
            match self.file.read_at(&mut dst[done..], from + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        if done < need {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "short read: expert data at offset {} ({} bytes) runs past the end of the \
                     model file (was it truncated?)",
                    e.offset, e.len
                ),
            ));
        }
        if let Some((profile, busy_until)) = &self.throttle {
            // Serialise on the emulated device: this read occupies it after the previous one.
            // The access latency is paid once per extent, as by one request for all of it.
            let bytes = range.len().min(need);
            let mut cost = Duration::from_secs_f64(bytes as f64 / profile.bytes_per_second);
            if piece == 0 {
                cost += profile.latency;
            }
            let finish = {
                let mut busy = busy_until.lock().unwrap_or_else(|p| p.into_inner());
                let begin = (*busy).max(t0);
                *busy = begin + cost;
                *busy
            };
            let now = Instant::now();
            if finish > now {
                std::thread::sleep(finish - now);
            }
        }
        Ok(())
    }

    /// Reads extent `e` into `buf` (at least `aligned_span(e)` bytes, page-aligned) and returns
    /// where the extent's bytes start inside `buf`.
    pub fn read(&self, e: Extent, buf: &mut [u8]) -> io::Result<usize> {
        for piece in 0..Self::pieces(e) {
            let range = self.piece_range(e, piece);
            self.read_piece(e, piece, &mut buf[range])?;
        }
        Ok((e.offset % PAGE as u64) as usize)
    }
}

fn libc_o_direct() -> i32 {
    libc::O_DIRECT
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An extent spanning several pieces, at an unaligned offset, read piece by piece (in
    /// reverse order, as concurrent readers may finish) gives exactly the file's bytes, with
    /// buffered and direct I/O; a file cut short inside the last piece is an error.
    #[test]
    fn pieces_cover_the_extent_exactly() {
        let path = std::env::temp_dir().join(format!("moe-edge-pieces-{}", std::process::id()));
        let data: Vec<u8> = (0..3 * PIECE + 5 * PAGE)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let e = Extent {
            offset: 1000,
            len: 2 * PIECE + 3000,
        };
        assert_eq!(FlashReader::pieces(e), 3);
        // O_DIRECT may be refused by the file system (tmpfs): then only buffered reads.
        for direct in [false, true] {
            let Ok(r) = FlashReader::open(&path, direct, None) else {
                assert!(direct, "buffered open failed");
                continue;
            };
            let layout = std::alloc::Layout::from_size_align(FlashReader::aligned_span(e), PAGE);
            let layout = layout.unwrap();
            // SAFETY: non-zero size; freed below with the same layout.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            // SAFETY: `ptr` holds `layout.size()` initialised bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, layout.size()) };
            let mut ok = true;
            for piece in (0..FlashReader::pieces(e)).rev() {
                let range = r.piece_range(e, piece);
                if r.read_piece(e, piece, &mut buf[range]).is_err() {
                    ok = false; // O_DIRECT refused at read time
                }
            }
            if ok {
                let lead = (e.offset % PAGE as u64) as usize;
                let want = &data[e.offset as usize..e.offset as usize + e.len];
                assert!(&buf[lead..lead + e.len] == want, "direct={direct}");
            } else {
                assert!(direct);
            }
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(ptr, layout) };
        }
        std::fs::write(&path, &data[..e.offset as usize + e.len - 1]).unwrap();
        let r = FlashReader::open(&path, false, None).unwrap();
        let mut buf = vec![0u8; FlashReader::aligned_span(e)];
        let err = r.read(e, &mut buf).unwrap_err();
        assert!(err.to_string().contains("short read"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
