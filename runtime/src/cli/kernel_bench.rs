//! `moe-run bench-kernels`: throughput of the matrix products on the shapes an MoE layer runs
//! (expert gate/up, expert down, attention projections), for one token (decode) and for a batch
//! (an expert's share of a prompt, and a whole prompt), for the scalar reference and the kernels
//! this CPU selects. Weights are random; speeds are what matters.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;

use crate::gguf::GgmlType;
use crate::tensor::kernels::{self, random_vec, Kernels};
use crate::tensor::quant::quantize;
use crate::tensor::random::random_blocks;
use crate::tensor::{matmul, MatmulScratch, QMatrix};

#[derive(clap::Args, Debug)]
pub struct KernelBenchArgs {
    /// Worker threads (default: all cores)
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Weight types to measure (f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q6_k)
    #[arg(long, value_delimiter = ',', default_value = "q8_0,q4_0")]
    types: Vec<String>,
    /// Also measure the scalar reference
    #[arg(long)]
    scalar: bool,
    /// Seconds per measurement
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
}

pub fn run(args: KernelBenchArgs, out: &mut dyn Write) -> Result<()> {
    crate::threads::set_global_threads(args.threads);
    let mut tables: Vec<&'static Kernels> = vec![kernels::best()];
    if args.scalar && !std::ptr::eq(kernels::best(), &kernels::SCALAR) {
        tables.push(&kernels::SCALAR);
    }
    // (rows, cols, tokens): expert gate/up and down of the benchmark shape, an attention
    // projection; one token, an expert's share of a 128-token prompt, a whole prompt.
    let shapes = [
        (384, 1024, 1),
        (1024, 384, 1),
        (1024, 1024, 1),
        (384, 1024, 16),
        (1024, 384, 16),
        (1024, 1024, 128),
    ];
    writeln!(
        out,
        "threads: {} (GMAC per CPU-second is the figure to trust on a busy machine)\n| kernels | type | rows x cols | tokens | GMAC/s | GMAC/CPU-s | weight GB/s |",
        rayon::current_num_threads()
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |")?;
    for name in &args.types {
        let ty = GgmlType::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = GgmlType::all().iter().map(|t| t.name()).collect();
            anyhow::anyhow!("unknown weight type `{name}` ({})", known.join(", "))
        })?;
        for &(rows, cols, n) in &shapes {
            if ty.row_bytes(cols).is_none() {
                // A k-quant row is whole 256-value blocks: the expert down shape (384) is not.
                continue;
            }
            // Several matrices, cycled, so a decode-sized matrix is not always in cache.
            let copies = (64 << 20) / (rows * cols) + 1;
            let mats: Vec<Vec<u8>> = (0..copies.min(8))
                .map(|i| random_weights(ty, rows * cols, i as u64 + 1))
                .collect();
            let x = random_vec(n * cols, 99, 1.0);
            let mut y = vec![0f32; n * rows];
            for k in &tables {
                let mut scratch = MatmulScratch::default();
                let mut calls = 0usize;
                let start = Instant::now();
                let cpu0 = cpu_seconds();
                while start.elapsed().as_secs_f64() < args.seconds {
                    let m = QMatrix::new(ty, rows, cols, &mats[calls % mats.len()]);
                    matmul(k, &m, &x, n, &mut y, &mut scratch);
                    calls += 1;
                }
                let secs = start.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                let macs = (rows * cols * n * calls) as f64;
                let bytes = (mats[0].len() * calls) as f64;
                writeln!(
                    out,
                    "| {} | {ty} | {rows} x {cols} | {n} | {:.2} | {:.2} | {:.2} |",
                    k.name,
                    macs / secs / 1e9,
                    macs / cpu / 1e9,
                    bytes / secs / 1e9
                )?;
            }
        }
    }
    memory_bandwidth(out)
}

/// Read bandwidth of main memory with the benchmark's threads: the roofline of decoding, which
/// reads every used weight once per token. Sums a buffer much larger than the caches, best of
/// several passes.
fn memory_bandwidth(out: &mut dyn Write) -> Result<()> {
    use rayon::prelude::*;
    const BYTES: usize = 1 << 30;
    let buf: Vec<u64> = (0..BYTES / 8).into_par_iter().map(|i| i as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let sum = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.max(BYTES as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    writeln!(
        out,
        "\nmemory read bandwidth: {best:.1} GB/s with {} threads (1 GiB, best of 5)",
        rayon::current_num_threads(),
    )?;
    Ok(())
}

/// `n` random weights of type `ty`. The converter encodes only some types; the others are
/// random blocks (arbitrary quants, small scales): the kernels' speed does not depend on the values.
fn random_weights(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    if ty.can_encode() {
        quantize(ty, &random_vec(n, seed, 1.0))
    } else {
        random_blocks(ty, n / ty.block_len(), seed, 0.01)
    }
}

/// CPU time of the whole process (all threads), so that a busy machine's lost time slices do
/// not count as kernel time.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
