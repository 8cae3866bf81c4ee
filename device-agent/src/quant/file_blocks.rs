//! A matrix taken straight from a GGUF tensor's blocks: no fp32 copy and no second rounding, so
//! loading a 4-bit file at its own format never holds the fp32 model (the loading peak of
//! [`crate::weights::load_gguf_held`]).
//!
//! GGUF's blocks, little-endian: Q8_0 `{d: f16, qs: [i8; 32]}` (34 bytes), Q4_0 `{d: f16,
//! qs: [u8; 16]}` (18), Q4_1 `{d: f16, m: f16, qs: [u8; 16]}` (20), nibbles in the order
//! [`super::q4`] describes. A row is `cols / 32` blocks; GGUF requires whole blocks.

use super::{q4::NIB, BlockFormat, QMatrix, QuantError, QK};

/// Bytes of one GGUF block of `format`.
pub fn block_bytes(format: BlockFormat) -> usize {
    match format {
        BlockFormat::Q8_0 => 2 + QK,
        BlockFormat::Q4_0 => 2 + NIB,
        BlockFormat::Q4_1 => 4 + NIB,
    }
}

impl QMatrix {
    /// The `[rows, cols]` matrix whose blocks a GGUF tensor of `format`'s type holds (`bytes`,
    /// row-major), taken as they are. Errors name what is wrong: a width that is not whole
    /// blocks, a byte count that is not the shape's, a scale or minimum that is not finite.
    /// `Ok(None)` where a Q8_0 block holds `-128`: legal in the file but outside the symmetric
    /// range the x86 kernels' sign trick needs, so the caller quantizes that tensor again from
    /// fp32 (our rule never writes `-128`).
    pub fn from_gguf_blocks(
        format: BlockFormat,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Option<QMatrix>, QuantError> {
        if !cols.is_multiple_of(QK) {
            return Err(QuantError::Blocks(format!(
                "{format} rows of {cols} values are not whole blocks of {QK}"
            )));
        }
        let nb = cols / QK;
        let size = block_bytes(format);
        let expected = rows.checked_mul(nb).and_then(|b| b.checked_mul(size));
        if expected != Some(bytes.len()) {
            return Err(QuantError::Shape {
                what: format!("{format} blocks of a [{rows}, {cols}] matrix (bytes)"),
                got: bytes.len(),
                expected: expected.unwrap_or(usize::MAX),
            });
        }
        let mut m = QMatrix::empty(format, rows, cols);
        m.d.reserve_exact(rows * nb);
        match format {
            BlockFormat::Q8_0 => m.qs.reserve_exact(rows * nb * QK),
            BlockFormat::Q4_0 => m.nib.reserve_exact(rows * nb * NIB),
            BlockFormat::Q4_1 => {
                m.nib.reserve_exact(rows * nb * NIB);
                m.m.reserve_exact(rows * nb);
            }
        }
        let f16 = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        for (k, blk) in bytes.chunks_exact(size).enumerate() {
            let params = if format == BlockFormat::Q4_1 { 2 } else { 1 };
            for (i, h) in blk[..2 * params].chunks_exact(2).map(f16).enumerate() {
                if !half::f16::from_bits(h).is_finite() {
                    let what = ["scale", "minimum"][i];
                    return Err(QuantError::Blocks(format!(
                        "{format} block {} of row {}: {what} {} is not finite",
                        k % nb,
                        k / nb,
                        half::f16::from_bits(h)
                    )));
                }
            }
            m.d.push(f16(blk));
            let values = &blk[2 * params..];
            match format {
                BlockFormat::Q8_0 => {
                    if values.contains(&0x80) {
                        return Ok(None);
                    }
                    m.qs.extend(values.iter().map(|&v| v as i8));
                }
                BlockFormat::Q4_0 => m.nib.extend_from_slice(values),
                BlockFormat::Q4_1 => {
                    m.m.push(f16(&blk[2..]));
                    m.nib.extend_from_slice(values);
                }
            }
        }
        Ok(Some(m))
    }

    /// Matrices of one format and width, their rows one after another (a tensor quantized a
    /// band of rows at a time). `None` for no parts or parts that disagree.
    pub fn stack_rows(parts: Vec<QMatrix>) -> Option<QMatrix> {
        let first = parts.first()?;
        let (format, cols) = (first.format, first.cols);
        if parts.iter().any(|p| p.format != format || p.cols != cols) {
            return None;
        }
        let mut m = QMatrix::empty(format, parts.iter().map(|p| p.rows).sum(), cols);
        for p in parts {
            m.qs.extend(p.qs);
            m.nib.extend(p.nib);
            m.d.extend(p.d);
            m.m.extend(p.m);
        }
        Some(m)
    }
}
