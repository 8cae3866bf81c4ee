//! Framed messages over a QUIC stream: length-prefixed [`protocol::codec`] frames, every read
//! capped (the length prefix is checked against the frame limit before the body is read, and
//! the body is read in chunks, so memory follows the bytes actually received). A server reads
//! with [`recv_frame_within`]: once a frame's first byte arrived, the whole frame must arrive
//! within a deadline, or the read fails and its buffer is freed (a peer that declares a large
//! frame and trickles it cannot hold memory for long). A device sends with
//! [`send_frame_within`], so an aggregator that stops reading cannot hold it in one send.

use std::time::Duration;

use protocol::{decode_body, encode_frame, frame_body_len, Message, FRAME_HEADER_BYTES};
use quinn::{RecvStream, SendStream};

use crate::TransportError;

/// Largest chunk read from a stream at once.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// Writes one frame; returns its size in bytes.
pub async fn send_frame(send: &mut SendStream, message: &Message) -> Result<usize, TransportError> {
    let frame = encode_frame(message)?;
    send.write_all(&frame).await?;
    Ok(frame.len())
}

/// [`send_frame`] with a deadline: a peer that stops reading withholds QUIC flow-control
/// credit (while its keep-alives go on), so a frame larger than the credit left would block for
/// ever; past `deadline` the send fails with [`TransportError::SendTimeout`] (the stream is
/// then mid-frame and good for nothing: the caller drops the connection).
pub async fn send_frame_within(
    send: &mut SendStream,
    message: &Message,
    deadline: Duration,
) -> Result<usize, TransportError> {
    match tokio::time::timeout(deadline, send_frame(send, message)).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::SendTimeout {
            limit_ms: deadline.as_millis() as u64,
        }),
    }
}

/// Writes one frame already encoded ([`protocol::encode_frame`]).
pub async fn send_frame_bytes(send: &mut SendStream, frame: &[u8]) -> Result<(), TransportError> {
    send.write_all(frame).await?;
    Ok(())
}

/// Reads one frame: `Ok(None)` when the peer finished the stream at a frame boundary. The
/// length prefix is checked against `max_frame_bytes` before any body byte is read, and the
/// body buffer grows only as bytes arrive. Returns the message and the frame size.
pub async fn recv_frame(
    recv: &mut RecvStream,
    max_frame_bytes: usize,
) -> Result<Option<(Message, usize)>, TransportError> {
    let mut first = [0u8; 1];
    match recv.read(&mut first).await? {
        None => Ok(None),
        Some(0) => Err(TransportError::Truncated {
            expected: FRAME_HEADER_BYTES,
            got: 0,
        }),
        Some(_) => recv_rest(recv, first[0], max_frame_bytes).await.map(Some),
    }
}

/// [`recv_frame`] with a deadline: waiting for a frame's first byte takes as long as the peer
/// likes (the connection's idle timeout and keep-alives govern that), but from the first byte
/// on the whole frame must arrive within `frame_timeout`, or [`TransportError::FrameTimeout`]
/// is returned and the partial frame dropped.
pub async fn recv_frame_within(
    recv: &mut RecvStream,
    max_frame_bytes: usize,
    frame_timeout: Duration,
) -> Result<Option<(Message, usize)>, TransportError> {
    let mut first = [0u8; 1];
    let lead = match recv.read(&mut first).await? {
        None => return Ok(None),
        Some(0) => {
            return Err(TransportError::Truncated {
                expected: FRAME_HEADER_BYTES,
                got: 0,
            })
        }
        Some(_) => first[0],
    };
    match tokio::time::timeout(frame_timeout, recv_rest(recv, lead, max_frame_bytes)).await {
        Ok(result) => result.map(Some),
        Err(_) => Err(TransportError::FrameTimeout {
            limit_ms: frame_timeout.as_millis() as u64,
        }),
    }
}

/// The rest of a frame whose first byte was `lead`.
async fn recv_rest(
    recv: &mut RecvStream,
    lead: u8,
    max_frame_bytes: usize,
) -> Result<(Message, usize), TransportError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    header[0] = lead;
    let mut filled = 1;
    while filled < FRAME_HEADER_BYTES {
        match recv.read(&mut header[filled..]).await? {
            Some(n) => filled += n,
            None => {
                return Err(TransportError::Truncated {
                    expected: FRAME_HEADER_BYTES,
                    got: filled,
                })
            }
        }
    }
    let body_len = frame_body_len(header, max_frame_bytes)?;
    let mut body = Vec::with_capacity(body_len.min(READ_CHUNK_BYTES));
    while body.len() < body_len {
        let want = (body_len - body.len()).min(READ_CHUNK_BYTES);
        match recv.read_chunk(want, true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => {
                return Err(TransportError::Truncated {
                    expected: body_len,
                    got: body.len(),
                })
            }
        }
    }
    let message = decode_body(&body)?;
    Ok((message, FRAME_HEADER_BYTES + body_len))
}

/// Both halves of a bidirectional stream carrying frames, with byte counters.
#[derive(Debug)]
pub struct FramedStream {
    send: SendStream,
    recv: RecvStream,
    max_frame_bytes: usize,
    bytes_sent: u64,
    bytes_received: u64,
}

impl FramedStream {
    /// Wraps a bidirectional stream; incoming frames over `max_frame_bytes` are refused.
    pub fn new(send: SendStream, recv: RecvStream, max_frame_bytes: usize) -> FramedStream {
        FramedStream {
            send,
            recv,
            max_frame_bytes,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// Sends one message; returns the frame size.
    pub async fn send(&mut self, message: &Message) -> Result<usize, TransportError> {
        let n = send_frame(&mut self.send, message).await?;
        self.bytes_sent += n as u64;
        Ok(n)
    }

    /// Receives one message; `None` when the peer finished its side.
    pub async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        match recv_frame(&mut self.recv, self.max_frame_bytes).await? {
            Some((message, n)) => {
                self.bytes_received += n as u64;
                Ok(Some(message))
            }
            None => Ok(None),
        }
    }

    /// Writes raw bytes (for tests that forge frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.send.write_all(bytes).await?;
        self.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    /// Finishes the sending side (the peer's `recv` then returns `None`).
    pub fn finish(&mut self) -> Result<(), TransportError> {
        Ok(self.send.finish()?)
    }

    /// The two halves, for a driver that reads and writes concurrently (use [`send_frame`]
    /// and [`recv_frame`] on them).
    pub fn into_parts(self) -> (SendStream, RecvStream) {
        (self.send, self.recv)
    }

    /// Frame bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Frame bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }
}
