//! The wire form of [`Buffer`], written and read in bulk.
//!
//! The bytes are exactly those `#[derive(Encode, Decode)]` gives under the codec's fixed-int,
//! little-endian configuration (a `u32` variant index, a `u64` element count, then each element
//! little-endian), so peers of any build interoperate; the derive moves one element per call
//! (each a fallible read with its own error path), which made decoding an adapter the largest
//! cost of a simulated device-round. Here the count is claimed against the decoder's byte limit
//! before anything is allocated, exactly as the derive does, and the elements are converted in
//! chunks.

use bincode::de::read::Reader;
use bincode::de::{BorrowDecoder, Decoder};
use bincode::enc::write::Writer;
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{BorrowDecode, Decode, Encode};

use crate::adapter::Buffer;

/// Bytes converted per chunk (bounded stack use whatever the buffer's length; small, since most
/// factors are a few hundred numbers and the chunk is zeroed on every call).
const CHUNK_BYTES: usize = 1024;

const F32_VARIANT: u32 = 0;
const F16_VARIANT: u32 = 1;

fn write_elements<E: Encoder, const N: usize, T: Copy>(
    e: &mut E,
    values: &[T],
    to_le: impl Fn(T) -> [u8; N],
) -> Result<(), EncodeError> {
    (values.len() as u64).encode(e)?;
    let mut chunk = [0u8; CHUNK_BYTES];
    for part in values.chunks(CHUNK_BYTES / N) {
        for (dst, &v) in chunk.chunks_exact_mut(N).zip(part) {
            dst.copy_from_slice(&to_le(v));
        }
        e.writer().write(&chunk[..part.len() * N])?;
    }
    Ok(())
}

fn read_elements<D: Decoder, const N: usize, T>(
    d: &mut D,
    from_le: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, DecodeError> {
    let count = u64::decode(d)?;
    let len = usize::try_from(count).map_err(|_| DecodeError::OutsideUsizeRange(count))?;
    // The claim fails before any allocation when the count is beyond the decoder's limit.
    d.claim_container_read::<T>(len)?;
    let mut out = Vec::with_capacity(len);
    let mut chunk = [0u8; CHUNK_BYTES];
    let mut left = len;
    while left > 0 {
        let k = left.min(CHUNK_BYTES / N);
        let bytes = &mut chunk[..k * N];
        d.reader().read(bytes)?;
        out.extend(bytes.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from_le(a)
        }));
        left -= k;
    }
    Ok(out)
}

impl Encode for Buffer {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            Buffer::F32(v) => {
                F32_VARIANT.encode(e)?;
                write_elements(e, v, f32::to_le_bytes)
            }
            Buffer::F16(v) => {
                F16_VARIANT.encode(e)?;
                write_elements(e, v, u16::to_le_bytes)
            }
        }
    }
}

impl<Context> Decode<Context> for Buffer {
    fn decode<D: Decoder<Context = Context>>(d: &mut D) -> Result<Self, DecodeError> {
        match u32::decode(d)? {
            F32_VARIANT => Ok(Buffer::F32(read_elements(d, f32::from_le_bytes)?)),
            F16_VARIANT => Ok(Buffer::F16(read_elements(d, u16::from_le_bytes)?)),
            found => Err(DecodeError::UnexpectedVariant {
                type_name: "Buffer",
                allowed: &bincode::error::AllowedEnumVariants::Range { min: 0, max: 1 },
                found,
            }),
        }
    }
}

impl<'de, Context> BorrowDecode<'de, Context> for Buffer {
    fn borrow_decode<D: BorrowDecoder<'de, Context = Context>>(
        d: &mut D,
    ) -> Result<Self, DecodeError> {
        Self::decode(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bincode::config;

    /// The shape the derive used to encode; the hand-written form must match it byte for byte.
    #[derive(Encode, Decode, Debug, PartialEq)]
    enum Derived {
        F32(Vec<f32>),
        F16(Vec<u16>),
    }

    fn cfg() -> config::Configuration<config::LittleEndian, config::Fixint> {
        config::standard().with_fixed_int_encoding()
    }

    #[test]
    fn bytes_are_those_of_the_derived_encoding_and_round_trip() {
        // Lengths around the chunk size, and special values.
        for n in [0usize, 1, 7, 1023, 1024, 1025, 5000] {
            let f: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => -0.0,
                    1 => f32::MIN_POSITIVE / 2.0,
                    2 => i as f32 * 1e-3,
                    3 => f32::NAN,
                    _ => -(i as f32),
                })
                .collect();
            let h: Vec<u16> = (0..n).map(|i| (i * 2654435761 % 65536) as u16).collect();
            for (ours, theirs) in [
                (Buffer::F32(f.clone()), Derived::F32(f.clone())),
                (Buffer::F16(h.clone()), Derived::F16(h.clone())),
            ] {
                let a = bincode::encode_to_vec(&ours, cfg()).unwrap();
                let b = bincode::encode_to_vec(&theirs, cfg()).unwrap();
                assert_eq!(a, b, "n = {n}");
                let (back, used): (Buffer, usize) = bincode::decode_from_slice(&a, cfg()).unwrap();
                assert_eq!(used, a.len());
                assert_eq!(
                    bincode::encode_to_vec(&back, cfg()).unwrap(),
                    a,
                    "n = {n}: decoding changed the bits"
                );
            }
        }
    }

    #[test]
    fn hostile_counts_and_short_input_are_refused_without_allocating_them() {
        // A count of 2^60 elements under a 1 MiB limit: refused by the claim.
        let mut bytes = F32_VARIANT.to_le_bytes().to_vec();
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let limited = cfg().with_limit::<{ 1 << 20 }>();
        let e = bincode::decode_from_slice::<Buffer, _>(&bytes, limited).unwrap_err();
        assert!(matches!(e, DecodeError::LimitExceeded), "{e:?}");
        // A count that fits the limit but more than the input holds: an unexpected end.
        let mut bytes = F16_VARIANT.to_le_bytes().to_vec();
        bytes.extend_from_slice(&100u64.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 20]);
        let e = bincode::decode_from_slice::<Buffer, _>(&bytes, limited).unwrap_err();
        assert!(matches!(e, DecodeError::UnexpectedEnd { .. }), "{e:?}");
        // An unknown variant.
        let mut bytes = 7u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let e = bincode::decode_from_slice::<Buffer, _>(&bytes, limited).unwrap_err();
        assert!(
            matches!(e, DecodeError::UnexpectedVariant { found: 7, .. }),
            "{e:?}"
        );
    }
}
