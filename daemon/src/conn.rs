//! One connection's state: whether it is inside a request or waiting for a request head (and
//! since when), and the bytes read from its socket. The request handlers ([`crate::http`]) mark
//! requests' beginnings and ends; the accept loop ([`crate::server`]) watches for a request head
//! that does not arrive.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Where a connection is: waiting for a request head since `since`, or inside a request.
struct Phase {
    in_request: bool,
    since: Instant,
    /// Bytes read when the wait began (to tell an idle keep-alive from a slow client).
    bytes_at: u64,
    served: u64,
}

/// Per-connection state shared by the request handlers and the head-timeout watcher.
pub struct ConnState {
    phase: Mutex<Phase>,
    changed: Notify,
    bytes_read: AtomicU64,
}

/// A fresh connection: waiting for its first request head since now.
impl Default for ConnState {
    fn default() -> Self {
        Self {
            phase: Mutex::new(Phase {
                in_request: false,
                since: Instant::now(),
                bytes_at: 0,
                served: 0,
            }),
            changed: Notify::new(),
            bytes_read: AtomicU64::new(0),
        }
    }
}

impl ConnState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn begin_request(&self) {
        self.lock().in_request = true;
        self.changed.notify_waiters();
    }

    pub fn end_request(&self) {
        {
            let mut p = self.lock();
            p.in_request = false;
            p.since = Instant::now();
            p.bytes_at = self.bytes_read.load(Relaxed);
            p.served += 1;
        }
        self.changed.notify_waiters();
    }

    /// Resolves when a request head has been awaited for `timeout`: true if the client owes
    /// us one (it sent part of a request, or none at all on a fresh connection) and should get
    /// 408, false for a keep-alive connection that simply went idle.
    pub async fn head_timeout(&self, timeout: Duration) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (in_request, since) = {
                let p = self.lock();
                (p.in_request, p.since)
            };
            if in_request {
                notified.await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(since + timeout) => {
                    let p = self.lock();
                    if p.in_request || p.since != since {
                        continue;
                    }
                    return p.served == 0 || self.bytes_read.load(Relaxed) > p.bytes_at;
                }
                _ = &mut notified => {}
            }
        }
    }
}

/// The socket, counting the bytes read from it into its connection's [`ConnState`].
pub struct CountingIo {
    inner: UnixStream,
    state: Arc<ConnState>,
}

impl CountingIo {
    pub fn new(inner: UnixStream, state: Arc<ConnState>) -> Self {
        Self { inner, state }
    }

    pub fn into_inner(self) -> UnixStream {
        self.inner
    }
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.state.bytes_read.fetch_add(n as u64, Relaxed);
        res
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
