//! The one frame format of the protocol and the one codec for it, used by the server
//! (through tokio's `FramedRead`), the client (its buffered reader), the blocking
//! helpers and the tests.
//!
//! A frame is a 4-byte big-endian body length, then the body (a MessagePack message).
//! A length over [`MAX_FRAME_BYTES`] is refused from the prefix alone, before any buffer
//! is grown for it.
//!
//! ```
//! # fn main() -> shared_tensor_runtime::Result<()> {
//! use shared_tensor_runtime::wire::{frame_len, write_frame, ClientMessage, Request};
//! let mut out = Vec::new();
//! write_frame(&ClientMessage::Request { id: 1, request: Request::Ping }, &mut out)?;
//! // The whole frame is there: its length, prefix included.
//! assert_eq!(frame_len(&out).unwrap(), Some(out.len()));
//! // One byte short: not yet a frame.
//! assert_eq!(frame_len(&out[..out.len() - 1]).unwrap(), None);
//! # Ok(()) }
//! ```

use std::io::Read;

use serde::Serialize;

use crate::error::{Error, Result};

/// Largest frame body accepted, in bytes (64 MiB). Descriptors are small: a frame near
/// this limit is a bug or an attack, not a tensor.
///
/// ```
/// use shared_tensor_runtime::wire::{read_frame, MAX_FRAME_BYTES};
/// let prefix = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
/// let err = read_frame(&mut prefix.as_slice(), &mut Vec::new()).unwrap_err();
/// assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
/// ```
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of a frame's length prefix.
///
/// ```
/// use shared_tensor_runtime::wire::{write_frame, ClientMessage, PREFIX_BYTES};
/// let mut out = Vec::new();
/// write_frame(&ClientMessage::Release(vec![1]), &mut out).unwrap();
/// let body = &out[PREFIX_BYTES..]; // what `wire::decode` reads
/// assert_eq!(u32::from_be_bytes(out[..PREFIX_BYTES].try_into().unwrap()) as usize, body.len());
/// ```
pub const PREFIX_BYTES: usize = 4;

/// A length prefix that announces more than [`MAX_FRAME_BYTES`].
///
/// ```
/// use shared_tensor_runtime::wire::{frame_len, FrameTooLarge, MAX_FRAME_BYTES};
/// let prefix = u32::MAX.to_be_bytes();
/// assert_eq!(frame_len(&prefix), Err(FrameTooLarge { len: u32::MAX as usize }));
/// assert!(FrameTooLarge { len: MAX_FRAME_BYTES + 1 }.to_string().contains("limit"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer announced a {len}-byte frame, over the {MAX_FRAME_BYTES}-byte limit")]
pub struct FrameTooLarge {
    /// The body length the prefix announced.
    pub len: usize,
}

impl From<FrameTooLarge> for std::io::Error {
    fn from(e: FrameTooLarge) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// The body length a prefix announces, checked against the limit.
fn body_len(prefix: [u8; PREFIX_BYTES]) -> std::result::Result<usize, FrameTooLarge> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameTooLarge { len });
    }
    Ok(len)
}

/// The length (prefix included) of the frame at the start of `buf`: `Ok(None)` while its
/// prefix or body is not all there, an error as soon as the prefix is over the limit.
///
/// ```
/// use shared_tensor_runtime::wire::frame_len;
/// assert_eq!(frame_len(&[0, 0, 0, 2, 0xc0]), Ok(None)); // one body byte of two
/// assert_eq!(frame_len(&[0, 0, 0, 2, 0xc0, 0xc0, 9]), Ok(Some(6))); // then the next frame
/// ```
pub fn frame_len(buf: &[u8]) -> std::result::Result<Option<usize>, FrameTooLarge> {
    let Some(prefix) = buf.first_chunk::<PREFIX_BYTES>() else { return Ok(None) };
    let total = PREFIX_BYTES + body_len(*prefix)?;
    Ok((buf.len() >= total).then_some(total))
}

/// Appends one frame (length prefix and MessagePack body) to `out`; on error `out` is as
/// it was (never a partial frame).
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::wire::{write_frame, ClientMessage, Request};
/// let mut out = Vec::new();
/// write_frame(&ClientMessage::Request { id: 1, request: Request::Ping }, &mut out)?;
/// assert_eq!(u32::from_be_bytes(out[..4].try_into().unwrap()) as usize, out.len() - 4);
/// # Ok(()) }
/// ```
pub fn write_frame<T: Serialize + ?Sized>(msg: &T, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; PREFIX_BYTES]);
    if let Err(e) = rmp_serde::encode::write(out, msg) {
        out.truncate(start);
        return Err(Error::Protocol(format!("cannot encode a message: {e}")));
    }
    let len = out.len() - start - PREFIX_BYTES;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(Error::Protocol(format!(
            "a message of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit"
        )));
    }
    out[start..start + PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Reads one frame's body into `buf` (blocking). The length is checked against
/// [`MAX_FRAME_BYTES`] before anything is allocated.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use shared_tensor_runtime::wire::{read_frame, write_frame, ClientMessage};
/// let mut bytes = Vec::new();
/// write_frame(&ClientMessage::Release(vec![7]), &mut bytes).unwrap();
/// let (mut stream, mut body) = (bytes.as_slice(), Vec::new()); // a socket in practice
/// read_frame(&mut stream, &mut body)?;
/// assert_eq!(body.len(), bytes.len() - 4);
/// # Ok(()) }
/// ```
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut prefix = [0u8; PREFIX_BYTES];
    r.read_exact(&mut prefix)?;
    let len = body_len(prefix)?;
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)
}

/// Frames read into one buffer with as few reads as the data allows (the client's read
/// side): the caller reads into [`FrameBuf::spare`], reports it with
/// [`FrameBuf::filled`], and takes the complete frames with [`FrameBuf::next_frame`].
///
/// Invariants: `start <= end <= buf.len()`; `buf[start..end]` are the bytes read and not
/// yet taken, and they always begin at a frame boundary.
// The full client's (with the `cuda` feature); the control client reads whole frames.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
    /// First byte not yet taken.
    start: usize,
    /// End of the bytes read.
    end: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl FrameBuf {
    /// A buffer of `capacity` bytes to begin with (it grows for a larger frame).
    pub(crate) fn new(capacity: usize) -> FrameBuf {
        FrameBuf { buf: vec![0; capacity.max(PREFIX_BYTES)], start: 0, end: 0 }
    }

    /// The body of the next complete frame already read, if any; it is taken (the next
    /// call returns the frame after it).
    pub(crate) fn next_frame(&mut self) -> std::result::Result<Option<&[u8]>, FrameTooLarge> {
        let Some(len) = frame_len(&self.buf[self.start..self.end])? else { return Ok(None) };
        let body = self.start + PREFIX_BYTES..self.start + len;
        self.start = body.end;
        Ok(Some(&self.buf[body]))
    }

    /// Whether part of a frame has been read.
    pub(crate) fn partial(&self) -> bool {
        self.end > self.start
    }

    /// Where the next read goes: never empty, and once a frame's prefix is in, room for
    /// the whole of that frame. Bytes already taken are dropped first.
    pub(crate) fn spare(&mut self) -> std::result::Result<&mut [u8], FrameTooLarge> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if let Some(prefix) = self.buf[self.start..self.end].first_chunk::<PREFIX_BYTES>() {
            let need = self.start + PREFIX_BYTES + body_len(*prefix)?;
            if need > self.buf.len() {
                self.buf.resize(need, 0);
            }
        }
        if self.end == self.buf.len() {
            // A complete frame fills the buffer and is not taken yet: room for the next.
            self.buf.resize(self.buf.len() * 2, 0);
        }
        Ok(&mut self.buf[self.end..])
    }

    /// Records that `n` bytes were read into [`FrameBuf::spare`].
    pub(crate) fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end += n;
    }
}

/// The frame codec as tokio's `FramedRead` uses it (the server's read side): items are
/// frame bodies.
// The server's (with the `cuda` feature).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FrameCodec;

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = bytes::BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> std::io::Result<Option<bytes::BytesMut>> {
        match frame_len(src)? {
            Some(len) => {
                let mut frame = src.split_to(len);
                Ok(Some(frame.split_off(PREFIX_BYTES)))
            }
            None => {
                // Room for the whole frame once its length is known (one read, no regrowth).
                if let Some(prefix) = src.first_chunk::<PREFIX_BYTES>() {
                    let total = PREFIX_BYTES + body_len(*prefix)?;
                    src.reserve(total - src.len());
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::{decode, ClientMessage, Request};
    use tokio_util::codec::Decoder as _;

    fn frames(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for id in 0..n {
            write_frame(&ClientMessage::Request { id, request: Request::Ping }, &mut out).unwrap();
        }
        write_frame(&ClientMessage::Release((0..10_000).collect()), &mut out).unwrap();
        out
    }

    fn ids(bodies: &[Vec<u8>]) -> Vec<Option<u64>> {
        bodies
            .iter()
            .map(|b| match decode::<ClientMessage>(b).unwrap() {
                ClientMessage::Request { id, .. } => Some(id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn frame_buf_reassembles_frames_from_reads_of_any_size() {
        let bytes = frames(50);
        for chunk in [1, 3, 4, 5, 17, 4096, bytes.len()] {
            for capacity in [1, 8, 64 * 1024] {
                let mut fb = FrameBuf::new(capacity);
                let mut bodies = Vec::new();
                let mut input = bytes.as_slice();
                while !input.is_empty() {
                    let spare = fb.spare().unwrap();
                    let n = spare.len().min(chunk).min(input.len());
                    spare[..n].copy_from_slice(&input[..n]);
                    input = &input[n..];
                    fb.filled(n);
                    while let Some(body) = fb.next_frame().unwrap() {
                        bodies.push(body.to_vec());
                    }
                }
                assert!(!fb.partial(), "chunk {chunk}, capacity {capacity}");
                let mut want: Vec<Option<u64>> = (0..50).map(Some).collect();
                want.push(None);
                assert_eq!(ids(&bodies), want, "chunk {chunk}, capacity {capacity}");
            }
        }
    }

    #[test]
    fn a_prefix_over_the_limit_is_refused_before_any_room_is_made() {
        let mut fb = FrameBuf::new(16);
        let prefix = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        fb.spare().unwrap()[..4].copy_from_slice(&prefix);
        fb.filled(4);
        assert_eq!(fb.next_frame(), Err(FrameTooLarge { len: MAX_FRAME_BYTES + 1 }));
        assert_eq!(fb.spare().map(|s| s.len()), Err(FrameTooLarge { len: MAX_FRAME_BYTES + 1 }));
        assert!(fb.buf.len() < 64, "no room was made for the announced frame");

        let mut src = bytes::BytesMut::from(&prefix[..]);
        let err = FrameCodec.decode(&mut src).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("over the 67108864-byte limit"), "{err}");
        assert!(src.capacity() < 1024);
    }

    #[test]
    fn an_oversized_length_prefix_is_refused_before_allocating() {
        let mut bytes = (u32::MAX).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let mut buf = Vec::new();
        let err = read_frame(&mut std::io::Cursor::new(bytes), &mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(buf.capacity() < 1024, "nothing was allocated for the announced frame");
    }

    #[test]
    fn the_tokio_codec_and_the_blocking_reader_read_what_write_frame_wrote() {
        let bytes = frames(20);
        // The codec, fed in pieces as a socket would.
        let (mut src, mut bodies) = (bytes::BytesMut::new(), Vec::new());
        for piece in bytes.chunks(7) {
            src.extend_from_slice(piece);
            while let Some(body) = FrameCodec.decode(&mut src).unwrap() {
                bodies.push(body.to_vec());
            }
        }
        assert!(src.is_empty());
        let mut blocking = Vec::new();
        let (mut input, mut buf) = (bytes.as_slice(), Vec::new());
        while !input.is_empty() {
            read_frame(&mut input, &mut buf).unwrap();
            blocking.push(buf.clone());
        }
        assert_eq!(bodies, blocking);
        assert_eq!(ids(&bodies).len(), 21);
        // A body short of its prefix's length is an error for the blocking reader.
        let mut one = Vec::new();
        write_frame(&ClientMessage::Release(vec![1, 2, 3]), &mut one).unwrap();
        let mut input = &one[..one.len() - 1];
        let err = read_frame(&mut input, &mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn write_frame_leaves_nothing_behind_when_it_fails() {
        let mut out = vec![1, 2, 3];
        let huge = serde_bytes::ByteBuf::from(vec![0u8; MAX_FRAME_BYTES + 1]);
        let err = write_frame(&huge, &mut out).unwrap_err();
        assert!(err.to_string().contains("frame limit"), "{err}");
        assert_eq!(out, [1, 2, 3]);
    }
}
