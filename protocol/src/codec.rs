//! Length-prefixed bincode framing with hard size limits, checked before anything is allocated.
//!
//! # Frame layout
//! ```text
//! [u32 LE body_len][body: b"FS" | u16 LE protocol version | bincode(Message)]
//! ```
//! `body_len` is checked against the caller's limit (never above [`MAX_FRAME_BYTES`]) before
//! the body is read or buffered. The body's magic and version are checked before bincode runs,
//! so a peer speaking another protocol version gets [`CodecError::VersionMismatch`], not a
//! garbled decode error.
//!
//! bincode runs with fixed-width integers (so an f16 buffer costs two bytes per value, and
//! every container's in-memory size is at most its wire size plus small struct overhead) and
//! with a decode limit of about twice the body length: a forged inner length prefix (say a
//! vector claiming 64 GiB) fails with a limit error instead of allocating the claimed size.

use bincode::config;
use bincode::enc::write::SizeWriter;
use bincode::error::{DecodeError, EncodeError};

use crate::message::Message;
use crate::PROTOCOL_VERSION;

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Bytes of the body prefix (magic and version) before the bincode message.
pub const BODY_PREFIX_BYTES: usize = 4;
/// First two bytes of every body.
pub const MAGIC: [u8; 2] = *b"FS";
/// Hard ceiling on a frame body whatever limit a caller asks for (256 MiB).
pub const MAX_FRAME_BYTES: usize = 256 << 20;
/// Default limit on a frame body (128 MiB: a rank-64 f32 adapter of SmolLM2-135M is ~78 MB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 128 << 20;

/// Why a frame could not be encoded or decoded. Every variant except `Encode` means the bytes
/// are invalid (a "need more bytes" state is [`Decoded::NeedMore`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("frame body of {len} bytes is shorter than its {BODY_PREFIX_BYTES}-byte prefix")]
    FrameTooShort { len: usize },
    #[error("bad magic {found:02x?}: not a FedSpine frame")]
    BadMagic { found: [u8; 2] },
    #[error("protocol version mismatch: this side speaks {ours}, the peer sent {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("invalid message body: {0}")]
    Decode(#[source] DecodeError),
    #[error("{extra} unexpected bytes after the message")]
    TrailingBytes { extra: usize },
    #[error("cannot encode message: {0}")]
    Encode(#[source] EncodeError),
}

/// Outcome of trying to decode a frame from the front of a buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A whole frame: the message and how many bytes of the buffer it used.
    Frame { message: Message, consumed: usize },
    /// The buffer holds a valid prefix; at least this many more bytes are needed.
    NeedMore { at_least: usize },
}

type WireConfig = config::Configuration<config::LittleEndian, config::Fixint, config::NoLimit>;

fn wire_config() -> WireConfig {
    config::standard().with_fixed_int_encoding()
}

fn clamp_limit(max_frame_bytes: usize) -> usize {
    max_frame_bytes.min(MAX_FRAME_BYTES)
}

/// Encodes `message` as one frame appended to `out`; returns the frame's length in bytes.
/// Fails if the body would exceed [`MAX_FRAME_BYTES`].
pub fn encode_frame_into(message: &Message, out: &mut Vec<u8>) -> Result<usize, CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    if let Err(e) = bincode::encode_into_std_write(message, out, wire_config()) {
        out.truncate(start);
        return Err(CodecError::Encode(e));
    }
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    if body_len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(CodecError::FrameTooLarge {
            len: body_len as u64,
            max: MAX_FRAME_BYTES as u64,
        });
    }
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(out.len() - start)
}

/// The length of the frame [`encode_frame`] would produce for `message`, counted without
/// writing it anywhere (a device sizes its update this way before sending it, without a copy
/// of a possibly 20 MB frame). Fails as encoding would.
pub fn frame_len(message: &Message) -> Result<usize, CodecError> {
    let mut encoder = bincode::enc::EncoderImpl::new(SizeWriter::default(), wire_config());
    bincode::Encode::encode(message, &mut encoder).map_err(CodecError::Encode)?;
    let body_len =
        MAGIC.len() + PROTOCOL_VERSION.to_le_bytes().len() + encoder.into_writer().bytes_written;
    if body_len > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge {
            len: body_len as u64,
            max: MAX_FRAME_BYTES as u64,
        });
    }
    Ok(FRAME_HEADER_BYTES + body_len)
}

/// Bytes an adapter-carrying message's factors take (its other fields are small): enough room
/// to encode it without growing the buffer through every doubling.
fn size_hint(message: &Message) -> usize {
    let factors = |a: &crate::AdapterPayload| -> usize {
        a.layers
            .iter()
            .map(|l| l.a.data.byte_len() + l.b.data.byte_len() + 64)
            .sum()
    };
    let big = match message {
        Message::Update(u) => factors(&u.adapter),
        Message::RoundConfig(rc) => rc.global.as_ref().map_or(0, |g| factors(&g.adapter)),
        _ => 0,
    };
    big + 1024
}

/// Encodes `message` as one frame.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(size_hint(message));
    encode_frame_into(message, &mut out)?;
    Ok(out)
}

/// Reads a length prefix and checks it against `max_frame_bytes` (clamped to
/// [`MAX_FRAME_BYTES`]): the body length to read next, or an error before anything is allocated.
pub fn frame_body_len(
    header: [u8; FRAME_HEADER_BYTES],
    max_frame_bytes: usize,
) -> Result<usize, CodecError> {
    let len = u32::from_le_bytes(header) as u64;
    let max = clamp_limit(max_frame_bytes) as u64;
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    let len = len as usize;
    if len < BODY_PREFIX_BYTES {
        return Err(CodecError::FrameTooShort { len });
    }
    Ok(len)
}

fn decode_with_limit<const LIMIT: usize>(payload: &[u8]) -> Result<Message, CodecError> {
    let (message, used): (Message, usize) =
        bincode::decode_from_slice(payload, wire_config().with_limit::<LIMIT>())
            .map_err(CodecError::Decode)?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(message)
}

/// Decodes a frame body (everything after the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, CodecError> {
    if body.len() < BODY_PREFIX_BYTES {
        return Err(CodecError::FrameTooShort { len: body.len() });
    }
    let magic = [body[0], body[1]];
    if magic != MAGIC {
        return Err(CodecError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([body[2], body[3]]);
    if version != PROTOCOL_VERSION {
        return Err(CodecError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let payload = &body[BODY_PREFIX_BYTES..];
    // bincode's limit is a const generic; pick the smallest power-of-two tier that covers twice
    // the payload plus slack, so a small frame can never make the decoder reserve much memory.
    let budget = payload.len().saturating_mul(2).saturating_add(64 << 10);
    macro_rules! tiers {
        ($($shift:literal),*) => {
            $(
                if budget <= (1usize << $shift) {
                    return decode_with_limit::<{ 1usize << $shift }>(payload);
                }
            )*
        };
    }
    tiers!(17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30);
    decode_with_limit::<{ 1usize << 31 }>(payload)
}

/// Tries to decode one frame from the front of `buf`, refusing bodies over `max_frame_bytes`
/// as soon as the length prefix is visible.
pub fn decode_frame(buf: &[u8], max_frame_bytes: usize) -> Result<Decoded, CodecError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(Decoded::NeedMore {
            at_least: FRAME_HEADER_BYTES - buf.len(),
        });
    }
    let header = [buf[0], buf[1], buf[2], buf[3]];
    let body_len = frame_body_len(header, max_frame_bytes)?;
    let total = FRAME_HEADER_BYTES + body_len;
    if buf.len() < total {
        return Ok(Decoded::NeedMore {
            at_least: total - buf.len(),
        });
    }
    let message = decode_body(&buf[FRAME_HEADER_BYTES..total])?;
    Ok(Decoded::Frame {
        message,
        consumed: total,
    })
}

/// Incremental decoder for a byte stream: push bytes as they arrive, pop whole messages.
/// It never buffers a body whose announced length exceeds the limit.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder refusing bodies over `max_frame_bytes` (clamped to [`MAX_FRAME_BYTES`]).
    pub fn new(max_frame_bytes: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            max_frame_bytes: clamp_limit(max_frame_bytes),
        }
    }

    /// Appends received bytes; fails at once if the frame at the front announces too large a
    /// body. Drain with [`FrameDecoder::next_message`] after every push: the decoder holds what
    /// it is given.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), CodecError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= FRAME_HEADER_BYTES {
            let header = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
            if let Err(e) = frame_body_len(header, self.max_frame_bytes) {
                self.buf.clear();
                return Err(e);
            }
        }
        Ok(())
    }

    /// The next whole message, `None` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, CodecError> {
        match decode_frame(&self.buf, self.max_frame_bytes)? {
            Decoded::Frame { message, consumed } => {
                self.buf.drain(..consumed);
                Ok(Some(message))
            }
            Decoded::NeedMore { .. } => Ok(None),
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}
