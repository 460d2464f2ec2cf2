//! Shared by the daemon's integration tests: a fixture model, the real `moed` binary started on a
//! temporary socket, and a small HTTP/1.1 client over the socket (tests need to misbehave on the
//! wire: send half a request, stall, hang up mid-stream).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The qwen3_moe fixture (random weights, ChatML template) converted once per test binary.
pub fn model_path() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        if let Ok(p) = std::env::var("MOED_TEST_MODEL") {
            return PathBuf::from(p);
        }
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moed-fixture");
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!("qwen3_moe-{}.gguf", std::process::id()));
        moe_convert::convert(
            &fixture,
            &tmp,
            &moe_convert::ConvertOptions::new(moe_runtime::gguf::GgmlType::F32),
            &|_, _, _| {},
        )
        .expect("converting the qwen3_moe fixture");
        let path = dir.join("qwen3_moe.gguf");
        std::fs::rename(&tmp, &path).unwrap();
        path
    })
}

/// The model id moed derives from the fixture's file name.
pub fn model_id() -> String {
    model_path()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts moed on a fresh socket with `args` added, and waits until /health says ready.
    pub fn start(args: &[&str]) -> Daemon {
        let d = Self::spawn(args);
        d.wait_ready(Duration::from_secs(60));
        d
    }

    /// Starts moed without waiting.
    pub fn spawn(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/moed.sock");
        Self::spawn_at(dir, socket, args)
    }

    pub fn spawn_at(dir: tempfile::TempDir, socket: PathBuf, args: &[&str]) -> Daemon {
        Self::spawn_env(dir, socket, args, &[])
    }

    /// Starts moed on another model file, and waits until /health says ready.
    pub fn start_model(model: &Path, args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/moed.sock");
        let d = Self::spawn_model(dir, socket, model, args, &[]);
        d.wait_ready(Duration::from_secs(60));
        d
    }

    /// Starts moed with extra environment variables.
    pub fn spawn_env(
        dir: tempfile::TempDir,
        socket: PathBuf,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Daemon {
        Self::spawn_model(dir, socket, model_path(), args, env)
    }

    /// Starts moed on another model file.
    pub fn spawn_model(
        dir: tempfile::TempDir,
        socket: PathBuf,
        model: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moed"))
            .arg("-m")
            .arg(model)
            .arg("--socket")
            .arg(&socket)
            .args(["--threads", "1"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting moed");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("MOED_TEST_ECHO").is_some() {
                    eprintln!("[moed] {line}");
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Daemon {
            child,
            socket,
            dir,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_ready(&self, limit: Duration) {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = try_request(&self.socket, "GET", "/health", None) {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                t0.elapsed() < limit,
                "moed did not become ready; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        try_request(&self.socket, method, path, body.map(str::as_bytes))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; moed log:\n{}", self.log()))
    }

    /// POSTs JSON; returns the status and the parsed body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.request("POST", path, Some(&body.to_string()));
        let v = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "{path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&r.body)
            )
        });
        (r.status, v)
    }

    /// Opens a streamed request; returns the response head and a reader for its events.
    pub fn stream(&self, path: &str, body: &Value) -> (Resp, SseReader) {
        let s = connect(&self.socket).expect("connect");
        open_stream(s, path, body)
    }

    pub fn metrics(&self) -> String {
        String::from_utf8(self.request("GET", "/metrics", None).body).unwrap()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                t0.elapsed() < limit,
                "moed did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the daemon (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        kb * 1024
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `name` in a Prometheus exposition (the first sample whose name and labels start
/// with it).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name) && l[name.len()..].starts_with([' ', '{'])
                || l.starts_with(&format!("{name} "))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(socket)?;
    // Long enough for a grammar-constrained reply under qemu-aarch64 (the CI's Pi emulation),
    // which took over a minute; a hung daemon still fails the test.
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    Ok(s)
}

pub fn write_request(
    s: &mut UnixStream,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        head += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        );
    }
    head += "\r\n";
    // One write, so the whole request is in the socket before the daemon can answer early.
    let mut all = head.into_bytes();
    all.extend_from_slice(body.unwrap_or_default());
    s.write_all(&all)
}

pub fn try_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let mut s = connect(socket)?;
    write_request(&mut s, method, path, body)?;
    read_response(&mut BufReader::new(s))
}

/// Reads a status line and headers.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Resp {
        status,
        headers,
        body: Vec::new(),
    })
}

pub fn read_response(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut resp = read_head(r)?;
    resp.body = read_body(r, &resp)?;
    Ok(resp)
}

/// The body after `head`, or what could be read of it.
pub fn read_response_body(r: &mut impl BufRead, head: &Resp) -> Vec<u8> {
    read_body(r, head).unwrap_or_default()
}

fn read_body(r: &mut impl BufRead, resp: &Resp) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        while let Some(chunk) = read_chunk(r)? {
            body.extend(chunk);
        }
    } else if let Some(n) = resp.header("content-length").and_then(|v| v.parse().ok()) {
        body = vec![0; n];
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

/// One chunk of a chunked body; None at the end.
fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let size = usize::from_str_radix(line.trim(), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    let mut data = vec![0; size + 2];
    r.read_exact(&mut data)?;
    data.truncate(size);
    Ok((size > 0).then_some(data))
}

pub fn open_stream(mut s: UnixStream, path: &str, body: &Value) -> (Resp, SseReader) {
    write_request(&mut s, "POST", path, Some(body.to_string().as_bytes())).unwrap();
    let mut r = BufReader::new(s);
    let head = read_head(&mut r).unwrap();
    (head, SseReader::new(r))
}

/// Reads server-sent events from a chunked body.
pub struct SseReader {
    pub r: BufReader<UnixStream>,
    buf: Vec<u8>,
    ended: bool,
}

impl SseReader {
    pub fn new(r: BufReader<UnixStream>) -> Self {
        Self {
            r,
            buf: Vec::new(),
            ended: false,
        }
    }

    /// The next event's `data:` payload, None at the end of the body.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.buf.drain(..at + 2).collect();
                let text = String::from_utf8(ev).unwrap();
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                return Some(data.join("\n"));
            }
            if self.ended {
                assert!(self.buf.is_empty(), "trailing bytes: {:?}", self.buf);
                return None;
            }
            match read_chunk(&mut self.r).expect("reading the stream") {
                Some(c) => self.buf.extend(c),
                None => self.ended = true,
            }
        }
    }

    /// Every remaining event payload.
    pub fn all(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_data()).collect()
    }
}

/// The text of a streamed response, checking the events' shape: JSON chunks, then `[DONE]`
/// last. Returns (text, finish_reason, events).
pub fn collect_stream(events: &[String], chat: bool) -> (String, String, usize) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|_| panic!("event {e}"));
        assert!(v.get("error").is_none(), "error event {e}");
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let piece = if chat {
            &c["delta"]["content"]
        } else {
            &c["text"]
        };
        if let Some(p) = piece.as_str() {
            text += p;
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish, events.len())
}
