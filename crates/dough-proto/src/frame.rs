//! Length-prefixed framing.

use std::io::{self, Read, Write};

use serde::Serialize;

/// Largest payload accepted in one frame (1 MiB + room for headers).
pub const MAX_FRAME: usize = 1024 * 1024 + 1024;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Everything that can go wrong encoding, framing or decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("malformed message")]
    Decode(#[source] postcard::Error),
    #[error("message does not fit in a frame")]
    Encode(#[source] postcard::Error),
    #[error("reading or writing the channel's stream failed")]
    Io(#[from] io::Error),
}

/// Encode `msg` as one frame: length prefix followed by the payload.
/// [`FrameError::TooLarge`] if the payload would exceed [`MAX_FRAME`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; HEADER_LEN]).map_err(FrameError::Encode)?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Write one message as a frame and flush.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Read one frame's payload. `Ok(None)` on a clean end of stream at a frame
/// boundary; [`FrameError::Truncated`] if the stream ends inside a frame.
/// An oversized length prefix gives [`FrameError::TooLarge`] before any
/// payload buffer is allocated or any payload byte is read.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut hdr = [0u8; HEADER_LEN];
    let got = read_full(r, &mut hdr)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            got,
            want: HEADER_LEN,
        });
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(FrameError::Truncated { got, want: len });
    }
    Ok(Some(payload))
}

/// Read until `buf` is full or the stream ends; returns bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Incremental decoder for callers that read in arbitrary chunks (e.g. a
/// non-blocking virtio-serial port). Holds at most one partial frame, plus
/// whatever complete frames the caller has pushed but not yet taken: call
/// [`FrameDecoder::next_frame`] until it returns `Ok(None)` after every
/// [`FrameDecoder::push`], so memory stays bounded by about one read chunk
/// plus [`MAX_FRAME`].
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Offset of the first byte in `buf` not yet handed out. Consumed bytes
    /// are dropped lazily (on the next `push`) so that taking many small
    /// frames out of one large chunk stays linear rather than quadratic.
    start: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 {
            // Each byte is moved here at most a bounded number of times: only
            // the partial tail left after taking frames is shifted.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Drop any partial frame (after the peer went away).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Take the next complete frame's payload, if there is one. An oversized
    /// length is reported as soon as the header is seen; the decoder is then
    /// reset, since the stream cannot be resynchronised.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_FRAME {
            self.reset();
            return Err(FrameError::TooLarge(len));
        }
        if avail.len() - HEADER_LEN < len {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        if self.start == self.buf.len() {
            self.reset();
        }
        Ok(Some(payload))
    }
}
