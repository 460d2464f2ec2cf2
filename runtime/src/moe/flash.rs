//! Reading expert slabs from the model file with `pread` (optionally `O_DIRECT`), and an
//! optional flash emulator that throttles reads to a board's storage bandwidth and latency.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const PAGE: usize = 4096;

/// Storage speed to emulate: every read costs `latency + bytes / bandwidth`, one read at a
/// time, like a single flash device. For measurements on fast disks only; clearly emulation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashProfile {
    pub name: &'static str,
    pub bytes_per_second: f64,
    pub latency: Duration,
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
        },
        // The Pi 4's, Pi 3's and Zero 2 W's SD host (DDR50): about half the Pi 5's speed.
        FlashProfile {
            name: "microsd-pi4",
            bytes_per_second: 45e6,
            latency: Duration::from_micros(500),
        },
        FlashProfile {
            name: "usb-ssd",
            bytes_per_second: 350e6,
            latency: Duration::from_micros(150),
        },
        FlashProfile {
            name: "nvme",
            bytes_per_second: 800e6,
            latency: Duration::from_micros(60),
        },
    ];

    pub fn by_name(name: &str) -> Option<Self> {
        Self::PROFILES.into_iter().find(|p| p.name == name)
    }

    fn cost(&self, bytes: usize) -> Duration {
        self.latency + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second)
    }
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
        })
    }

    /// Room a slot needs to read `e` with page-aligned I/O: the extent plus the misalignment of
    /// its start, rounded up to whole pages.
    pub fn aligned_span(e: Extent) -> usize {
        let lead = (e.offset % PAGE as u64) as usize;
        (lead + e.len).div_ceil(PAGE) * PAGE
    }

    /// Reads extent `e` into `buf` (at least `aligned_span(e)` bytes, page-aligned) and returns
    /// where the extent's bytes start inside `buf`.
    pub fn read(&self, e: Extent, buf: &mut [u8]) -> io::Result<usize> {
        let lead = (e.offset % PAGE as u64) as usize;
        let start = e.offset - lead as u64;
        let span = Self::aligned_span(e);
        let t0 = Instant::now();
        let (dst, want) = if self.direct {
            (&mut buf[..span], span)
        } else {
            (&mut buf[lead..lead + e.len], e.len)
        };
        let from = if self.direct { start } else { e.offset };
        // With O_DIRECT the aligned span may run past the end of a file whose size is not a
        // whole number of pages; only the extent itself must be there.
        let need = if self.direct { lead + e.len } else { e.len };
        let mut done = 0;
        while done < want {
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
            let finish = {
                let mut busy = busy_until.lock().unwrap_or_else(|p| p.into_inner());
                let begin = (*busy).max(t0);
                *busy = begin + profile.cost(e.len);
                *busy
            };
            let now = Instant::now();
            if finish > now {
                std::thread::sleep(finish - now);
            }
        }
        Ok(lead)
    }
}

fn libc_o_direct() -> i32 {
    libc::O_DIRECT
}
