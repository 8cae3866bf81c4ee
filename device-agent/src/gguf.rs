//! GGUF v3 reading and writing: metadata, tensor directory, and (de)quantisation of the block
//! formats we support (F32, F16, BF16, Q8_0, Q4_0, Q4_1 in; F32, F16, Q8_0, Q4_0, Q4_1 out).
//!
//! Layout facts (GGUF v3): a header (magic `GGUF`, version, tensor count, metadata count), the
//! metadata key/value list, the tensor directory (name, dims `ne0..`, type, offset), then the
//! data section aligned to `general.alignment` (default 32). Dims are innermost first, so a
//! matrix with `(ne0, ne1)` is stored row-major as `[ne1][ne0]`.
//!
//! This file holds the format's types and the reader; [`writer`] quantizes and writes.

pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use writer::{quantize, write, WriteTensor};

use half::{bf16, f16};

/// Errors from reading or writing a GGUF file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    BadVersion { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated: {what} needs bytes up to offset {needed}, file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        needed: u64,
        len: u64,
    },
    #[error("{path}: malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{path}: tensor '{tensor}' has type {ggml_type} ({type_name}), which this loader does not support (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        ggml_type: u32,
        type_name: &'static str,
    },
    #[error("{path}: tensor '{tensor}' not found")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: metadata key '{key}' missing or of the wrong type ({expected} expected)")]
    MissingKey {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
}

/// GGML tensor types that appear in this code base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Bf16,
}

impl From<crate::quant::BlockFormat> for GgmlType {
    fn from(f: crate::quant::BlockFormat) -> Self {
        use crate::quant::BlockFormat;
        match f {
            BlockFormat::Q8_0 => GgmlType::Q8_0,
            BlockFormat::Q4_0 => GgmlType::Q4_0,
            BlockFormat::Q4_1 => GgmlType::Q4_1,
        }
    }
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Bf16 => 30,
        }
    }

    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }

    /// Bytes needed to store `n` elements (n must be a multiple of the block size).
    pub fn byte_len(self, n: usize) -> usize {
        let (be, bb) = self.block();
        n.div_ceil(be) * bb
    }

    /// [`GgmlType::byte_len`] for a count read from a file: `None` where it overflows.
    fn checked_byte_len(self, n: u64) -> Option<u64> {
        let (be, bb) = self.block();
        n.div_ceil(be as u64).checked_mul(bb as u64)
    }
}

/// Fewest bytes one metadata value of type `ty` takes in a file (an unknown type: 1, so the
/// parser reaches it and names it).
fn min_value_bytes(ty: u32) -> u64 {
    match ty {
        2 | 3 => 2,
        4..=6 => 4,
        // A string's length, an array's element type and count, or an 8-byte number.
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// Most metadata array elements a file may hold in all: a vocabulary, its scores, types and
/// merges take a few hundred thousand in the largest tokenizers; each parsed element takes
/// tens of bytes of memory, so a file's claim is bounded before it is believed.
const MAX_ARRAY_ELEMENTS: u64 = 1 << 23;

/// Largest `general.alignment` accepted (the format's default is 32).
const MAX_ALIGNMENT: u64 = 1 << 16;

/// Human name of a ggml type id, for error messages.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16..=23 => "IQ-family",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        _ => "unknown",
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dims innermost first (`ne0, ne1, ...`), as in the file.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
    map: memmap2::Mmap,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata array elements parsed so far (bounded by [`MAX_ARRAY_ELEMENTS`]).
    array_elements: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                needed: self.pos as u64 + n as u64,
                len: self.bytes.len() as u64,
            }),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, GgufError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes(
            b.try_into().expect("take(4) returned exactly 4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(
            b.try_into().expect("take(8) returned exactly 8 bytes"),
        ))
    }
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }
    /// Refuses a count of `n` items of at least `min_bytes` each that the rest of the file
    /// cannot hold, before anything is sized by it.
    fn claim(&self, n: u64, min_bytes: u64, what: &str) -> Result<(), GgufError> {
        match n.checked_mul(min_bytes) {
            Some(need) if need <= self.remaining() => Ok(()),
            need => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what}: {n} of at least {min_bytes} bytes each"),
                needed: need.map_or(u64::MAX, |b| b.saturating_add(self.pos as u64)),
                len: self.bytes.len() as u64,
            }),
        }
    }
    fn malformed(&self, what: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            what,
        }
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > self.bytes.len() as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} (string of {len} bytes)"),
                needed: self.pos as u64 + len,
                len: self.bytes.len() as u64,
            });
        }
        let b = self.take(len as usize, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.malformed(format!("{what}: not UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.u8(key)?),
            1 => Value::I8(self.u8(key)? as i8),
            2 => Value::U16(self.u16(key)?),
            3 => Value::I16(self.u16(key)? as i16),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => Value::Bool(self.u8(key)? != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.malformed(format!("metadata '{key}': arrays nested too deep")));
                }
                let elem_ty = self.u32(key)?;
                let n = self.u64(key)?;
                // A count the rest of the file cannot hold is a lie; so is one beyond any
                // tokenizer's, which would only cost memory.
                self.claim(
                    n,
                    min_value_bytes(elem_ty),
                    &format!("metadata array '{key}'"),
                )?;
                self.array_elements = self.array_elements.saturating_add(n);
                if self.array_elements > MAX_ARRAY_ELEMENTS {
                    return Err(self.malformed(format!(
                        "metadata array '{key}' of {n} elements: more than \
                         {MAX_ARRAY_ELEMENTS} array elements in the file"
                    )));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            other => {
                return Err(
                    self.malformed(format!("metadata '{key}' has unknown value type {other}"))
                )
            }
        })
    }
}

impl GgufFile {
    /// Open and parse the header, metadata and tensor directory; tensor data is read lazily.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the file is opened read-only and we never hand out references that outlive
        // the map; a concurrent writer truncating the file is outside our contract.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
            path: &path,
            array_elements: 0,
        };
        let magic: [u8; 4] = c
            .take(4, "magic")?
            .try_into()
            .expect("take(4) returned exactly 4 bytes");
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { path, found: magic });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::BadVersion { path, version });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            return Err(c.malformed(format!(
                "implausible counts: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }
        // A key's length, its type and a value of at least a byte.
        c.claim(n_kv, 13, "metadata entries")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            if metadata.contains_key(&key) {
                // Which of two values is meant cannot be known: neither is taken.
                return Err(c.malformed(format!("metadata key '{key}' appears twice")));
            }
            metadata.insert(key, v);
        }
        // A name's length, the dim count, one dim, the type and the offset.
        c.claim(n_tensors, 32, "tensor directory entries")?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.malformed(format!("tensor '{name}' has {n_dims} dims")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)?;
            if !names.insert(name.clone()) {
                return Err(c.malformed(format!("tensor '{name}' appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| (1..=MAX_ALIGNMENT).contains(a))
                .ok_or_else(|| {
                    c.malformed(format!(
                        "general.alignment {v:?} is not an integer in 1..={MAX_ALIGNMENT}"
                    ))
                })?,
        };
        // Below `pos + alignment`: no overflow.
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = map.len() as u64;
        for t in &tensors {
            if t.dims.contains(&0) {
                return Err(c.malformed(format!(
                    "tensor '{}' has a zero dimension: {:?}",
                    t.name, t.dims
                )));
            }
            let n = t
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| c.malformed(format!("tensor '{}' dims overflow", t.name)))?;
            let start = data_start.checked_add(t.offset).filter(|&s| s <= file_len);
            let Some(start) = start else {
                return Err(c.malformed(format!(
                    "tensor '{}' starts at offset {}, past the end of the data section \
                     ({} bytes)",
                    t.name,
                    t.offset,
                    file_len.saturating_sub(data_start)
                )));
            };
            if let Some(ty) = GgmlType::from_id(t.ggml_type) {
                let (be, _) = ty.block();
                if t.dims[0] % be as u64 != 0 {
                    return Err(c.malformed(format!(
                        "tensor '{}' row length {} is not a multiple of the block size {be}",
                        t.name, t.dims[0]
                    )));
                }
                let end = ty
                    .checked_byte_len(n)
                    .and_then(|len| start.checked_add(len));
                if end.is_none_or(|end| end > file_len) {
                    return Err(GgufError::Truncated {
                        path: path.clone(),
                        what: format!("data of tensor '{}' ({n} elements)", t.name),
                        needed: end.unwrap_or(u64::MAX),
                        len: file_len,
                    });
                }
            }
        }
        Ok(GgufFile {
            path,
            version,
            metadata,
            tensors,
            data_start,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.missing(key, "unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.missing(key, "number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| self.missing(key, "string"))
    }

    pub fn missing(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
        }
    }

    pub fn malformed(&self, what: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// Dequantize a tensor to f32, in file order (row-major `[ne1][ne0]`).
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), GgufError> {
        let (ty, bytes, dims) = self.read_raw(name)?;
        let n = dims.iter().product();
        Ok((dequantize(ty, bytes, n), dims))
    }

    /// Where tensor `name`'s bytes start in the file.
    pub fn data_offset(&self, name: &str) -> Result<u64, GgufError> {
        Ok(self.data_start + self.tensor_info(name)?.offset)
    }

    /// A tensor's type, its bytes as the file holds them (mapped, not copied) and its dims.
    pub fn read_raw(&self, name: &str) -> Result<(GgmlType, &[u8], Vec<usize>), GgufError> {
        let info = self.tensor_info(name)?;
        let ty = GgmlType::from_id(info.ggml_type).ok_or_else(|| GgufError::UnsupportedType {
            path: self.path.clone(),
            tensor: name.to_string(),
            ggml_type: info.ggml_type,
            type_name: ggml_type_name(info.ggml_type),
        })?;
        let n = info.n_elements() as usize;
        let start = (self.data_start + info.offset) as usize;
        let bytes = &self.map[start..start + ty.byte_len(n)];
        let dims = info.dims.iter().map(|&d| d as usize).collect();
        Ok((ty, bytes, dims))
    }
}

/// Dequantize `n` elements of type `ty` from `bytes` (which must hold exactly `ty.byte_len(n)`).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(h)),
        GgmlType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = h(&blk[0..2]);
                out.extend(blk[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
        }
        GgmlType::Q4_0 => {
            for blk in bytes.chunks_exact(18) {
                let d = h(&blk[0..2]);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as f32 - 8.0) * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as f32 - 8.0) * d));
            }
        }
        GgmlType::Q4_1 => {
            for blk in bytes.chunks_exact(20) {
                let d = h(&blk[0..2]);
                let m = h(&blk[2..4]);
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests;
