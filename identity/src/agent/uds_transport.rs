//! The Workload API's Unix socket transport, compatible with gRPC C-core clients.
//!
//! gRPC C-core (py-spiffe, and the C++ and Ruby clients) sends the percent-encoded socket
//! path as the HTTP/2 `:authority` of a Unix socket call (`tmp%2Fwrit%2Fagent.sock`).
//! The `h2` server under tonic refuses any authority with `%` and resets the stream
//! (hyperium/h2#487), so those clients could not use the agent at all. Go's HTTP/2 server
//! (SPIRE) accepts it.
//!
//! [`UdsStream`] fixes this on the wire, before `h2` parses anything: in each inbound
//! HEADERS frame it finds a literal, uncompressed `:authority` value and replaces every
//! `%` with `-` in place. The length is unchanged, so frame sizes and the HPACK dynamic
//! table stay exactly in step with the client; only the (unused) authority text differs.
//! Everything else passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HTTP/2 frame header length.
const FRAME_HEADER: usize = 9;
/// Frame type HEADERS.
const HEADERS: u8 = 0x1;
/// HEADERS flags.
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame buffered whole (the h2 default maximum frame size is 16 KiB; clients may
/// not exceed what the server advertises, and tonic's server advertises the default).
const MAX_FRAME: usize = 1 << 24;

/// A Workload API connection: a Unix stream whose inbound HTTP/2 `:authority` is made
/// acceptable to `h2` (see the module docs).
#[derive(Debug)]
pub struct UdsStream {
    inner: UnixStream,
    /// Bytes read from the socket, not yet released.
    pending: Vec<u8>,
    /// How many leading bytes of `pending` are ready to hand to the reader.
    ready: usize,
    /// Whether the preface has been passed through.
    preface_done: bool,
}

impl UdsStream {
    /// Wraps an accepted connection.
    pub fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            ready: 0,
            preface_done: false,
        }
    }

    /// Moves complete frames (and the preface) from pending into the ready prefix,
    /// sanitizing HEADERS frames on the way.
    fn release(&mut self) {
        loop {
            let rest = self.pending.get(self.ready..).unwrap_or_default();
            if !self.preface_done {
                if rest.len() < PREFACE.len() {
                    return;
                }
                self.preface_done = true;
                self.ready += PREFACE.len();
                continue;
            }
            let Some(&[l0, l1, l2, kind, flags, ..]) = rest.get(..FRAME_HEADER) else {
                return;
            };
            let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
            let total = FRAME_HEADER + len;
            if len > MAX_FRAME {
                // Not HTTP/2 we understand: stop touching anything, pass the rest as is.
                self.ready = self.pending.len();
                return;
            }
            if rest.len() < total {
                return;
            }
            if kind == HEADERS && flags & END_HEADERS != 0 {
                let start = self.ready + FRAME_HEADER;
                if let Some(payload) = self.pending.get_mut(start..start + len) {
                    sanitize_headers_payload(payload, flags);
                }
            }
            self.ready += total;
        }
    }
}

/// Replaces `%` with `-` in literal, non-Huffman `:authority` values of a HEADERS
/// payload (a whole header block). Stops quietly at anything it does not understand.
fn sanitize_headers_payload(payload: &mut [u8], flags: u8) {
    let mut pos = 0usize;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let Some(&pad) = payload.first() else { return };
        pos += 1;
        end = match end.checked_sub(usize::from(pad)) {
            Some(e) => e,
            None => return,
        };
    }
    if flags & PRIORITY != 0 {
        pos += 5;
    }
    let Some(block) = payload.get_mut(pos..end) else {
        return;
    };
    let _ = walk_block(block);
}

/// Walks HPACK representations; `None` on anything malformed (left for h2 to refuse).
fn walk_block(block: &mut [u8]) -> Option<()> {
    let mut i = 0usize;
    while i < block.len() {
        let b = *block.get(i)?;
        if b & 0x80 != 0 {
            // Indexed header field.
            i = skip_int(block, i, 7)?;
        } else if b & 0xE0 == 0x20 {
            // Dynamic table size update.
            i = skip_int(block, i, 5)?;
        } else {
            // Literal: with incremental indexing (6-bit index) or without / never
            // indexed (4-bit index).
            let prefix = if b & 0xC0 == 0x40 { 6 } else { 4 };
            let (index, next) = read_int(block, i, prefix)?;
            i = next;
            let authority_name = if index == 0 {
                let (name, next) = read_str(block, i)?;
                i = next;
                name == Some(b":authority".as_slice())
            } else {
                index == 1 // static table entry 1 is :authority
            };
            let (huffman, len, start) = str_header(block, i)?;
            let stop = start.checked_add(len)?;
            if authority_name && !huffman {
                for byte in block.get_mut(start..stop)? {
                    if *byte == b'%' {
                        *byte = b'-';
                    }
                }
            }
            i = stop;
        }
    }
    Some(())
}

/// An HPACK integer with an `n`-bit prefix starting at `i`: `(value, next index)`.
fn read_int(block: &[u8], i: usize, n: u32) -> Option<(usize, usize)> {
    let max = (1usize << n) - 1;
    let mut value = usize::from(*block.get(i)?) & max;
    let mut i = i + 1;
    if value < max {
        return Some((value, i));
    }
    let mut shift = 0u32;
    loop {
        let b = *block.get(i)?;
        i += 1;
        value = value.checked_add(usize::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some((value, i));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

fn skip_int(block: &[u8], i: usize, n: u32) -> Option<usize> {
    read_int(block, i, n).map(|(_, next)| next)
}

/// A string literal's header: `(huffman, length, start of bytes)`.
fn str_header(block: &[u8], i: usize) -> Option<(bool, usize, usize)> {
    let huffman = *block.get(i)? & 0x80 != 0;
    let (len, start) = read_int(block, i, 7)?;
    Some((huffman, len, start))
}

/// A string literal: its raw bytes (`None` if Huffman-coded) and the next index.
fn read_str(block: &[u8], i: usize) -> Option<(Option<&[u8]>, usize)> {
    let (huffman, len, start) = str_header(block, i)?;
    let stop = start.checked_add(len)?;
    let bytes = block.get(start..stop)?;
    Some(((!huffman).then_some(bytes), stop))
}

impl AsyncRead for UdsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(this.pending.get(..n).unwrap_or_default());
                this.pending.drain(..n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let filled = read.filled();
                    if filled.is_empty() {
                        // EOF: release whatever is left (a truncated frame is h2's to refuse).
                        this.ready = this.pending.len();
                        if this.ready == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    this.pending.extend_from_slice(filled);
                    this.release();
                }
            }
        }
    }
}

impl AsyncWrite for UdsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for UdsStream {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HEADERS block gRPC C-core 1.85 sent for a Unix socket call (captured).
    fn c_core_block() -> Vec<u8> {
        let mut b = vec![0x40, 0x05];
        b.extend_from_slice(b":path");
        b.push(0x1f);
        b.extend_from_slice(b"/SpiffeWorkloadAPI/FetchJWTSVID");
        b.push(0x40);
        b.push(0x0a);
        b.extend_from_slice(b":authority");
        b.push(0x15);
        b.extend_from_slice(b"tmp%2Fcapdir%2Fs.sock");
        b.extend_from_slice(&[0x83, 0x86]);
        b
    }

    #[test]
    fn rewrites_percent_in_literal_authority_only() {
        let mut block = c_core_block();
        let before = block.clone();
        walk_block(&mut block).unwrap();
        assert_eq!(block.len(), before.len(), "length unchanged");
        let text = String::from_utf8_lossy(&block);
        assert!(text.contains("tmp-2Fcapdir-2Fs.sock"));
        assert!(text.contains("/SpiffeWorkloadAPI/FetchJWTSVID"));
    }

    #[test]
    fn indexed_name_and_huffman_values() {
        // :authority by static index 1 (literal with incremental indexing).
        let mut block = vec![0x41, 0x03, b'a', b'%', b'b'];
        walk_block(&mut block).unwrap();
        assert_eq!(&block[2..], b"a-b");
        // Huffman-coded values are left alone.
        let mut block = vec![0x41, 0x83, b'a', b'%', b'b'];
        walk_block(&mut block).unwrap();
        assert_eq!(&block[2..], b"a%b");
        // Other headers with % are untouched.
        let mut block = vec![0x44, 0x03, b'/', b'%', b'2'];
        walk_block(&mut block).unwrap();
        assert_eq!(&block[2..], b"/%2");
    }

    proptest::proptest! {
        /// Arbitrary header blocks: never a panic, never a change of length, and only
        /// `%` bytes ever change (into `-`).
        #[test]
        fn garbage_never_panics_and_only_percent_changes(block in proptest::collection::vec(proptest::num::u8::ANY, 0..256), flags in proptest::num::u8::ANY) {
            let mut out = block.clone();
            sanitize_headers_payload(&mut out, flags);
            proptest::prop_assert_eq!(out.len(), block.len());
            for (a, b) in block.iter().zip(&out) {
                proptest::prop_assert!(a == b || (*a == b'%' && *b == b'-'));
            }
        }
    }

    #[test]
    fn oversized_integers_are_refused() {
        assert_eq!(read_int(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 0, 7), None);
    }
}
