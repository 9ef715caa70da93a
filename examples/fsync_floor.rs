//! The durable record's physical floor: what appending audit-record-sized lines durably costs
//! on this disk and kernel, with nothing else — no gateway, no hashing, no JSON.
//!
//! One thread appends `--records` lines of `--bytes` bytes to a fresh file in `--dir`, in
//! batches of `--batch` lines (the group commit's batch size), each batch made durable before
//! the next is written, by one of these ways (`--way`):
//!
//! - `fdatasync`: `pwrite` the batch, then `fdatasync` (what xgate's writer does);
//! - `prealloc`:  the same, into a file zero-filled ahead in 1 MiB chunks, so a flush writes
//!   data only, never the new length (xgate's `audit.preallocate_bytes`);
//! - `dsync`:     the file opened `O_DSYNC`: each `pwrite` returns once durable (no
//!   `fdatasync` call);
//! - `rwf-dsync`: `pwritev2(RWF_DSYNC)` on a plain file: durable per write, per call.
//!
//! It prints records/s, flushes/s and the CPU (user + system, `getrusage`) per record and per
//! flush, as one JSON line, so `benches/fsync_floor.py` can set it beside xgate's `sync`-over-
//! `async` CPU per call at the same batch size.
//!
//! `cargo run --profile dist --example fsync_floor -- --way fdatasync --batch 4`

use std::{
    fs::OpenOptions,
    io,
    os::unix::{fs::FileExt, fs::OpenOptionsExt, io::AsRawFd},
    path::PathBuf,
    time::Instant,
};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Way {
    Fdatasync,
    Prealloc,
    Dsync,
    RwfDsync,
}

struct Args {
    dir: PathBuf,
    records: u64,
    bytes: usize,
    batch: usize,
    way: Way,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        dir: std::env::temp_dir(),
        records: 20_000,
        bytes: 700,
        batch: 1,
        way: Way::Fdatasync,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(v()?),
            "--records" => a.records = v()?.parse().map_err(|e| format!("--records: {e}"))?,
            "--bytes" => a.bytes = v()?.parse().map_err(|e| format!("--bytes: {e}"))?,
            "--batch" => a.batch = v()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--way" => {
                a.way = match v()?.as_str() {
                    "fdatasync" => Way::Fdatasync,
                    "prealloc" => Way::Prealloc,
                    "dsync" => Way::Dsync,
                    "rwf-dsync" => Way::RwfDsync,
                    w => {
                        return Err(format!(
                            "--way {w}: fdatasync, prealloc, dsync or rwf-dsync"
                        ));
                    }
                }
            }
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.batch == 0 || a.bytes < 2 {
        return Err("--batch ≥ 1 and --bytes ≥ 2".into());
    }
    Ok(a)
}

/// User + system CPU of this process so far, in µs (from /proc: no unsafe code).
fn cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime, in clock ticks of 10 ms.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 10_000
}

/// `pwritev2(fd, [buf], off, RWF_DSYNC)`: the one system call std has no wrapper for.
#[allow(unsafe_code)]
fn pwrite_dsync(f: &std::fs::File, buf: &[u8], off: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over a buffer we borrow for the call; the kernel only reads it.
    let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, off as i64, libc::RWF_DSYNC) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn run(a: &Args) -> io::Result<()> {
    let path = a
        .dir
        .join(format!("fsync-floor-{}.jsonl", std::process::id()));
    let mut opts = OpenOptions::new();
    opts.create_new(true).read(true).write(true);
    if a.way == Way::Dsync {
        opts.custom_flags(libc::O_DSYNC);
    }
    let f = opts.open(&path)?;
    let result = (|| {
        // One record: a line of `bytes` bytes, as the trail writes one.
        let mut line = vec![b'x'; a.bytes];
        line[a.bytes - 1] = b'\n';
        let batch: Vec<u8> = line.repeat(a.batch);
        const CHUNK: u64 = 1 << 20;
        let mut zeroed = 0u64;
        let zeros = vec![0u8; CHUNK as usize];
        let (mut off, mut written, mut flushes) = (0u64, 0u64, 0u64);
        let (t0, c0) = (Instant::now(), cpu_us());
        while written < a.records {
            if a.way == Way::Prealloc && off + batch.len() as u64 > zeroed {
                // Zero-fill the next chunk and make it (and the length) durable once.
                f.write_all_at(&zeros, zeroed)?;
                f.sync_data()?;
                zeroed += CHUNK;
            }
            match a.way {
                Way::Fdatasync | Way::Prealloc => {
                    f.write_all_at(&batch, off)?;
                    f.sync_data()?;
                }
                Way::Dsync => f.write_all_at(&batch, off)?,
                Way::RwfDsync => {
                    if pwrite_dsync(&f, &batch, off)? != batch.len() {
                        return Err(io::Error::other("a short write"));
                    }
                }
            }
            off += batch.len() as u64;
            written += a.batch as u64;
            flushes += 1;
        }
        let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_us() - c0);
        println!(
            "{{\"way\":\"{:?}\",\"batch\":{},\"bytes\":{},\"records\":{written},\"records_per_s\":{:.0},\"flushes_per_s\":{:.0},\"cpu_us_per_record\":{:.2},\"cpu_us_per_flush\":{:.2}}}",
            a.way,
            a.batch,
            a.bytes,
            written as f64 / secs,
            flushes as f64 / secs,
            cpu as f64 / written as f64,
            cpu as f64 / flushes as f64,
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fsync_floor: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&a) {
        eprintln!("fsync_floor: {e}");
        std::process::exit(1);
    }
}
