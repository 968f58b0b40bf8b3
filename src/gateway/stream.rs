//! The byte stream under a bot's WebSocket: plain TCP or TLS ([`BotStream`]), wrapped in
//! [`FrameWatch`], which bounds how long an incoming message may stay incomplete.
//!
//! Why a byte-level watch: tungstenite buffers a fragmented message internally and hands
//! out interleaved Ping frames meanwhile, so above it a connection that sent half a
//! message and then only pings looks alive and healthy. `FrameWatch` reads the frame
//! headers (RFC 6455 §5.2) of the bytes passing through — it never copies or changes them
//! — and knows when a data message started and when its final frame's payload ended.
//! Control frames, which may come between fragments, neither start nor end a message, so
//! pings cannot extend the deadline. When a message is still incomplete
//! `message_timeout` after its first header, the next read fails with
//! [`MessageTimeout`], which the reader turns into Close 1008.
//!
//! The HTTP upgrade request passes through first: frames are parsed only after its
//! terminating blank line, which is exactly where tungstenite starts reading frames.
//! This module does no WebSocket protocol work itself and knows nothing of bots.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// A bot's transport: plain TCP or server-side TLS.
pub enum BotStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for BotStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BotStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BotStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BotStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BotStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BotStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BotStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BotStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BotStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BotStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The error inside the `io::Error` a read returns once a message is overdue.
#[derive(Debug, thiserror::Error)]
#[error("message not completed within {0:?}")]
pub struct MessageTimeout(pub Duration);

impl MessageTimeout {
    /// True when `e` is the error [`FrameWatch`] produced.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref()
            .is_some_and(|inner| inner.is::<MessageTimeout>())
    }
}

/// Where the parser is in the incoming byte stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// In the HTTP request; `matched` bytes of `\r\n\r\n` seen.
    Http { matched: u8 },
    /// Collecting a frame header.
    Header { buf: [u8; 14], have: u8 },
    /// Skipping a frame's payload; `ends_message` when it is the final frame of a data message.
    Payload { left: u64, ends_message: bool },
}

/// Follows frame boundaries in the client→server byte stream.
#[derive(Debug)]
struct Tracker {
    state: State,
    /// A data message has started and its final frame has not fully arrived.
    in_message: bool,
}

/// What one chunk of bytes did to the message state.
#[derive(Debug, Default, PartialEq, Eq)]
struct Change {
    /// A message started (the deadline starts now); the last change in the chunk wins.
    started: bool,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            state: State::Http { matched: 0 },
            in_message: false,
        }
    }

    /// Feeds bytes as they arrive; returns whether a new message started in them.
    fn feed(&mut self, mut bytes: &[u8]) -> Change {
        let mut change = Change::default();
        while !bytes.is_empty() {
            match &mut self.state {
                State::Http { matched } => {
                    const END: &[u8; 4] = b"\r\n\r\n";
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    *matched = if b == END[*matched as usize] {
                        *matched + 1
                    } else if b == b'\r' {
                        1
                    } else {
                        0
                    };
                    if *matched == 4 {
                        self.state = State::Header {
                            buf: [0; 14],
                            have: 0,
                        };
                    }
                }
                State::Header { buf, have } => {
                    buf[*have as usize] = bytes[0];
                    *have += 1;
                    bytes = &bytes[1..];
                    let Some(need) = header_len(&buf[..*have as usize]) else {
                        continue;
                    };
                    if (*have as usize) < need {
                        continue;
                    }
                    let (fin, opcode, len) = parse_header(&buf[..need]);
                    let data = opcode <= 2;
                    if data && !self.in_message {
                        self.in_message = true;
                        change.started = true;
                    }
                    let ends_message = data && fin;
                    self.state = State::Payload {
                        left: len,
                        ends_message,
                    };
                    self.end_payload_if_done();
                }
                State::Payload { left, .. } => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    self.end_payload_if_done();
                }
            }
        }
        change
    }

    fn end_payload_if_done(&mut self) {
        if let State::Payload {
            left: 0,
            ends_message,
        } = self.state
        {
            if ends_message {
                self.in_message = false;
            }
            self.state = State::Header {
                buf: [0; 14],
                have: 0,
            };
        }
    }
}

/// The full header length once the first two bytes are known.
fn header_len(h: &[u8]) -> Option<usize> {
    if h.len() < 2 {
        return None;
    }
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
    Some(2 + ext + mask)
}

/// (FIN, opcode, payload length) of a complete header.
fn parse_header(h: &[u8]) -> (bool, u8, u64) {
    let fin = h[0] & 0x80 != 0;
    let opcode = h[0] & 0x0f;
    let len = match h[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[2..10]);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    (fin, opcode, len)
}

/// Wraps a bot's stream; see the module docs.
pub struct FrameWatch<S> {
    inner: S,
    tracker: Tracker,
    timeout: Duration,
    /// Armed while a message is incomplete; allocated once per connection.
    deadline: Pin<Box<Sleep>>,
}

impl<S> FrameWatch<S> {
    pub fn new(inner: S, timeout: Duration) -> FrameWatch<S> {
        FrameWatch {
            inner,
            tracker: Tracker::new(),
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Ready(Err) once an incomplete message is overdue; registers the waker otherwise.
    fn poll_overdue(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.tracker.in_message && self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                MessageTimeout(self.timeout),
            ));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameWatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Checked first as well: a peer that keeps bytes flowing (pings) never lets the
        // inner read return Pending.
        if let Poll::Ready(e) = this.poll_overdue(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let change = this.tracker.feed(&buf.filled()[before..]);
                if change.started {
                    let at = Instant::now() + this.timeout;
                    this.deadline.as_mut().reset(at);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_overdue(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameWatch<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame header + payload.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    fn upgraded() -> Tracker {
        let mut t = Tracker::new();
        t.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        t
    }

    #[test]
    fn pings_between_fragments_do_not_end_a_message() {
        let mut t = upgraded();
        assert!(!t.in_message);
        assert!(t.feed(&frame(false, 1, b"{\"op\":")).started);
        assert!(t.in_message);
        for _ in 0..3 {
            assert!(!t.feed(&frame(true, 9, b"hi")).started);
            assert!(t.in_message, "a ping does not complete the message");
        }
        t.feed(&frame(false, 0, b"\"ping\""));
        assert!(t.in_message);
        t.feed(&frame(true, 0, b"}"));
        assert!(!t.in_message);
    }

    #[test]
    fn byte_by_byte_and_long_frames() {
        let mut t = upgraded();
        let big = vec![b'x'; 70_000];
        let mut bytes = frame(true, 2, &big);
        bytes.extend(frame(true, 1, &[b'y'; 300]));
        let first_len = 14 + big.len();
        let mut started = 0;
        for (i, b) in bytes.iter().enumerate() {
            if t.feed(std::slice::from_ref(b)).started {
                started += 1;
            }
            if (13..first_len - 1).contains(&i) {
                assert!(t.in_message, "byte {i}");
            }
        }
        assert_eq!(started, 2);
        assert!(!t.in_message);
        // Pings alone never start a message.
        assert!(!t.feed(&frame(true, 9, b"")).started);
        assert!(!t.in_message);
    }

    #[test]
    fn http_request_split_anywhere() {
        let mut t = Tracker::new();
        let mut req = b"GET / HTTP/1.1\r\nX: a\r\r\n\r".to_vec();
        req.extend(b"\n");
        for b in &req {
            t.feed(std::slice::from_ref(b));
        }
        assert!(matches!(t.state, State::Header { have: 0, .. }));
        assert!(t.feed(&frame(false, 1, b"a")).started);
    }
}
