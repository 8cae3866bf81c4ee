//! The GGUF reader and writer on small files written here.

use super::*;

/// A scratch directory, removed when dropped (also when the test fails).
fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fedspine-gguf-{tag}-"))
        .tempdir()
        .unwrap()
}

#[test]
fn write_then_read_round_trips_f32_f16_q8() {
    let tmp_dir = tmpdir("rt");
    let dir = tmp_dir.path().to_path_buf();
    let path = dir.join("t.gguf");
    let vals: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
    let tensors = vec![
        WriteTensor {
            name: "a".into(),
            dims: vec![32, 2],
            ggml_type: GgmlType::F32,
            values: vals.clone(),
        },
        WriteTensor {
            name: "b".into(),
            dims: vec![64],
            ggml_type: GgmlType::F16,
            values: vals.clone(),
        },
        WriteTensor {
            name: "c".into(),
            dims: vec![32, 2],
            ggml_type: GgmlType::Q8_0,
            values: vals.clone(),
        },
    ];
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::Str("llama".into()),
        ),
        (
            "x.list".to_string(),
            Value::Array(vec![Value::U32(3), Value::U32(4)]),
        ),
    ];
    write(&path, &meta, &tensors).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(
        g.get("x.list").unwrap(),
        &Value::Array(vec![Value::U32(3), Value::U32(4)])
    );
    let (a, dims) = g.read_f32("a").unwrap();
    assert_eq!(dims, vec![32, 2]);
    assert_eq!(a, vals);
    let (b, _) = g.read_f32("b").unwrap();
    for (x, y) in b.iter().zip(&vals) {
        assert!((x - y).abs() < 2e-3);
    }
    let (c, _) = g.read_f32("c").unwrap();
    let amax = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (x, y) in c.iter().zip(&vals) {
        assert!((x - y).abs() <= amax / 127.0, "{x} vs {y}");
    }
}

#[test]
fn q4_blocks_dequantize_by_formula() {
    // Q4_1: d = 0.5, m = -1.0, nibbles 0..15 low then high.
    let mut blk = Vec::new();
    blk.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
    blk.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
    for i in 0..16u8 {
        blk.push(i | ((15 - i) << 4));
    }
    let v = dequantize(GgmlType::Q4_1, &blk, 32);
    assert_eq!(v[0], -1.0);
    assert_eq!(v[15], 15.0 * 0.5 - 1.0);
    assert_eq!(v[16], 15.0 * 0.5 - 1.0);
    assert_eq!(v[31], -1.0);
    // Q4_0: d = 2, value = (q - 8) * d.
    let mut blk = Vec::new();
    blk.extend_from_slice(&f16::from_f32(2.0).to_le_bytes());
    for i in 0..16u8 {
        blk.push(i | (8 << 4));
    }
    let v = dequantize(GgmlType::Q4_0, &blk, 32);
    assert_eq!(v[0], -16.0);
    assert_eq!(v[9], 2.0);
    assert_eq!(v[20], 0.0);
}

#[test]
fn bad_files_are_clear_errors() {
    let tmp_dir = tmpdir("bad");
    let dir = tmp_dir.path().to_path_buf();
    let p = dir.join("magic.gguf");
    std::fs::write(&p, b"GGML\x03\0\0\0").unwrap();
    let e = GgufFile::open(&p).err().unwrap();
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("magic.gguf"));

    // A valid file cut short inside the tensor data.
    let good = dir.join("good.gguf");
    write(
        &good,
        &[],
        &[WriteTensor {
            name: "w".into(),
            dims: vec![32, 4],
            ggml_type: GgmlType::F32,
            values: vec![1.0; 128],
        }],
    )
    .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = GgufFile::open(&cut).err().unwrap();
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("cut.gguf") && e.to_string().contains("'w'"));
    // Cut inside the header.
    std::fs::write(&cut, &bytes[..30]).unwrap();
    assert!(matches!(
        GgufFile::open(&cut).err().unwrap(),
        GgufError::Truncated { .. }
    ));

    // An unknown quant type: patch the type id of the only tensor to Q6_K (14).
    let mut patched = bytes.clone();
    let name_pos = patched.windows(1).position(|w| w == b"w").unwrap();
    // after the name: n_dims (4) + 2 dims (16) then type (4)
    let ty_pos = name_pos + 1 + 4 + 16;
    patched[ty_pos..ty_pos + 4].copy_from_slice(&14u32.to_le_bytes());
    let q6 = dir.join("q6k.gguf");
    std::fs::write(&q6, &patched).unwrap();
    let g = GgufFile::open(&q6).unwrap();
    let e = g.read_f32("w").err().unwrap();
    assert!(
        e.to_string().contains("Q6_K") && e.to_string().contains("q6k.gguf"),
        "{e}"
    );
}

/// A GGUF file's bytes as an attacker writes them: `counts` (tensors, metadata entries) as
/// claimed, the metadata and tensor directory entries as given (name, dims, type id, offset),
/// then `data` bytes of tensor data after padding to 32.
fn raw_file(
    counts: Option<(u64, u64)>,
    meta: &[(&str, Value)],
    infos: &[(&str, Vec<u64>, u32, u64)],
    data: usize,
) -> Vec<u8> {
    use super::writer::{put_str, put_value};
    let (n_tensors, n_kv) = counts.unwrap_or((infos.len() as u64, meta.len() as u64));
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        put_value(&mut b, v, true);
    }
    for (name, dims, ty, offset) in infos {
        put_str(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32 + data, 0);
    b
}

/// Opens `bytes` as a file: the error, which must name the file.
fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> GgufError {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = GgufFile::open(&p)
        .err()
        .expect("a hostile file must be refused");
    assert!(e.to_string().contains(name), "{e}");
    e
}

/// Counts, offsets, sizes and dims chosen to overflow the reader's arithmetic or to make it
/// allocate for data the file does not hold: each is a clear error naming what was wrong, not
/// a panic, a wrapped bound that lets a read run past the map, or a huge allocation.
#[test]
fn hostile_counts_offsets_and_dims_are_refused() {
    let tmp_dir = tmpdir("hostile");
    let dir = tmp_dir.path();
    let f32_id = GgmlType::F32.id();
    // The control: the same builder's honest file opens and reads.
    let good = raw_file(None, &[], &[("w", vec![32, 2], f32_id, 0)], 256);
    let p = dir.join("good.gguf");
    std::fs::write(&p, &good).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.read_f32("w").unwrap().0, vec![0.0; 64]);

    // An offset that wraps `data_start + offset` around to a small number.
    let e = open_err(
        dir,
        "offset.gguf",
        &raw_file(None, &[], &[("w", vec![32, 2], f32_id, u64::MAX - 70)], 256),
    );
    assert!(
        e.to_string().contains("past the end of the data section"),
        "{e}"
    );
    // A size that wraps `n * 4` to 0.
    let e = open_err(
        dir,
        "size.gguf",
        &raw_file(None, &[], &[("w", vec![1 << 62], f32_id, 0)], 256),
    );
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("data of tensor 'w'"), "{e}");
    // Size zero: no bound on the other dims.
    let e = open_err(
        dir,
        "zero.gguf",
        &raw_file(None, &[], &[("w", vec![0, 1 << 62], f32_id, 0)], 256),
    );
    assert!(e.to_string().contains("zero dimension"), "{e}");
    // An unsupported type still has its offset bounded (its size cannot be).
    let e = open_err(
        dir,
        "type.gguf",
        &raw_file(None, &[], &[("w", vec![32], 999, u64::MAX)], 0),
    );
    assert!(e.to_string().contains("past the end"), "{e}");
    // Alignment pushing the data section's start out of the file.
    let huge = [("general.alignment", Value::U64(1 << 40))];
    let e = open_err(
        dir,
        "align.gguf",
        &raw_file(None, &huge, &[("w", vec![32], f32_id, 0)], 128),
    );
    assert!(e.to_string().contains("general.alignment"), "{e}");
    let zero = [("general.alignment", Value::U32(0))];
    let e = open_err(
        dir,
        "align0.gguf",
        &raw_file(None, &zero, &[("w", vec![32], f32_id, 0)], 128),
    );
    assert!(e.to_string().contains("general.alignment"), "{e}");

    // Two values for one name: which is meant cannot be known.
    let twice = [("k", Value::U32(1)), ("k", Value::U32(2))];
    let e = open_err(dir, "key2.gguf", &raw_file(None, &twice, &[], 0));
    assert!(
        e.to_string().contains("metadata key 'k' appears twice"),
        "{e}"
    );
    let infos = [("w", vec![32], f32_id, 0), ("w", vec![32], f32_id, 128)];
    let e = open_err(dir, "tensor2.gguf", &raw_file(None, &[], &infos, 256));
    assert!(e.to_string().contains("tensor 'w' appears twice"), "{e}");

    // Counts the file cannot hold are refused before anything is sized by them (2^24 tensor
    // entries would be about a gigabyte of directory).
    let e = open_err(
        dir,
        "tensors.gguf",
        &raw_file(Some((1 << 24, 0)), &[], &[], 64),
    );
    assert!(e.to_string().contains("tensor directory entries"), "{e}");
    let e = open_err(
        dir,
        "entries.gguf",
        &raw_file(Some((0, 1 << 24)), &[], &[], 64),
    );
    assert!(e.to_string().contains("metadata entries"), "{e}");
    // An array of u64 whose count fits the bytes left but not at 8 bytes each.
    let mut b = raw_file(Some((0, 1)), &[], &[], 0);
    b.truncate(24);
    put_array_head(&mut b, "a", 10, 1000);
    b.resize(b.len() + 1000, 0);
    let e = open_err(dir, "array.gguf", &b);
    assert!(e.to_string().contains("metadata array 'a'"), "{e}");
    // A file of many honest small arrays past the total bound.
    let mut b = raw_file(Some((0, 1)), &[], &[], 0);
    b.truncate(24);
    let n = MAX_ARRAY_ELEMENTS + 1;
    put_array_head(&mut b, "bytes", 0, n);
    b.resize(b.len() + n as usize, 0);
    let e = open_err(dir, "many.gguf", &b);
    assert!(e.to_string().contains("array elements in the file"), "{e}");
}

/// A metadata entry `key` of type array, elements of type `elem`, claiming `n` of them.
fn put_array_head(b: &mut Vec<u8>, key: &str, elem: u32, n: u64) {
    super::writer::put_str(b, key);
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&elem.to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
}
