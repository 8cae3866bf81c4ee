//! Writing GGUF v3 files: the header, metadata and tensor directory, quantisation of the output
//! types (F32, F16, BF16, Q8_0, Q4_0, Q4_1; the block rules are the quantized base's), and the data section at the file's alignment, written
//! atomically.

use std::io::Write;
use std::path::Path;

use half::{bf16, f16};

use super::{GgmlType, GgufError, Value};

/// Quantize f32 values to the given output type.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ty.byte_len(values.len()));
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            // The block rule is the quantized base's (one definition).
            let mut q = [0i8; 32];
            for blk in values.chunks(32) {
                let d = crate::quant::quantize_block(blk, &mut q);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(q.iter().map(|&v| v as u8));
            }
        }
        GgmlType::Q4_0 => {
            let mut nib = [0u8; 16];
            for blk in values.chunks(32) {
                let d = crate::quant::q4::quantize_block_q4_0(blk, &mut nib);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&nib);
            }
        }
        GgmlType::Q4_1 => {
            let mut nib = [0u8; 16];
            for blk in values.chunks(32) {
                let (d, m) = crate::quant::q4::quantize_block_q4_1(blk, &mut nib);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(m).to_le_bytes());
                out.extend_from_slice(&nib);
            }
        }
    }
    out
}

/// A tensor to write: name, dims innermost first, type and f32 values in file order.
pub struct WriteTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub values: Vec<f32>,
}

/// Write a GGUF v3 file atomically (temp file then rename).
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[WriteTensor],
) -> Result<(), GgufError> {
    const ALIGN: u64 = 32;
    let io = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head: Vec<u8> = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k);
        put_value(&mut head, v, true);
    }
    let mut datas = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        let data = quantize(t.ggml_type, &t.values);
        offset += (data.len() as u64).div_ceil(ALIGN) * ALIGN;
        datas.push(data);
    }
    let pad = |len: u64| (len.div_ceil(ALIGN) * ALIGN - len) as usize;
    let tmp = path.with_extension("gguf.partial");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    f.write_all(&head).map_err(io)?;
    f.write_all(&vec![0u8; pad(head.len() as u64)])
        .map_err(io)?;
    for d in &datas {
        f.write_all(d).map_err(io)?;
        f.write_all(&vec![0u8; pad(d.len() as u64)]).map_err(io)?;
    }
    let f = f.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

pub(super) fn put_value(out: &mut Vec<u8>, v: &Value, with_type: bool) {
    if with_type {
        out.extend_from_slice(&value_type(v).to_le_bytes());
    }
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_str(out, s),
        Value::Array(items) => {
            let elem_ty = items.first().map(value_type).unwrap_or(4);
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it, false);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
