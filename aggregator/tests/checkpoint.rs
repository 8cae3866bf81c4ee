//! Checkpoint tests: round trip, atomic replacement, and every corruption refused by name.

use std::fs;
use std::path::Path;

use aggregator::aggregate::GlobalAdapter;
use aggregator::checkpoint::{self, CheckpointError, HEADER_BYTES};
use expect_test::expect;
use protocol::ModelDims;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct State {
    round: u64,
    global: GlobalAdapter,
    rng: rand_chacha::ChaCha8Rng,
    devices: Vec<(u64, String)>,
}

fn state(round: u64) -> State {
    let dims = ModelDims {
        n_blocks: 2,
        d_model: 8,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        ffn: 12,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(round);
    State {
        round,
        global: GlobalAdapter::init_lora(dims, 4, 8.0, &mut rng),
        rng,
        devices: vec![(1, "flex".into()), (2, "wgpu".into())],
    }
}

const SCHEMA: u32 = 3;

fn write(path: &Path, s: &State) {
    checkpoint::write_atomic(path, SCHEMA, s).unwrap();
}

#[test]
fn round_trip_and_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ckpt");
    assert!(checkpoint::read_if_exists::<State>(&path, SCHEMA)
        .unwrap()
        .is_none());
    write(&path, &state(1));
    assert_eq!(checkpoint::read::<State>(&path, SCHEMA).unwrap(), state(1));
    write(&path, &state(2));
    assert_eq!(
        checkpoint::read_if_exists::<State>(&path, SCHEMA).unwrap(),
        Some(state(2))
    );
    // No temporary file is left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["server.ckpt".to_string()]);
}

/// Writes a valid checkpoint, damages it with `damage`, and returns the read error's text with
/// the temporary directory replaced by `DIR`.
fn damaged(damage: impl FnOnce(&mut Vec<u8>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ckpt");
    write(&path, &state(1));
    let mut bytes = fs::read(&path).unwrap();
    damage(&mut bytes);
    fs::write(&path, &bytes).unwrap();
    let err: CheckpointError = checkpoint::read::<State>(&path, SCHEMA).unwrap_err();
    // The file is left as it was: never replaced or removed.
    assert_eq!(fs::read(&path).unwrap(), bytes);
    err.to_string()
        .replace(&dir.path().display().to_string(), "DIR")
}

#[test]
fn corrupt_truncated_or_incompatible_checkpoints_are_refused_by_name() {
    expect!["checkpoint DIR/server.ckpt is corrupt: body checksum mismatch"].assert_eq(&damaged(
        |b| {
            let i = b.len() - 10;
            b[i] ^= 0x40;
        },
    ));
    expect!["checkpoint DIR/server.ckpt is truncated: 3882 bytes expected, 3881 present"]
        .assert_eq(&damaged(|b| {
            b.pop();
        }));
    expect!["checkpoint DIR/server.ckpt is truncated: 56 bytes expected, 20 present"]
        .assert_eq(&damaged(|b| b.truncate(20)));
    expect!["checkpoint DIR/server.ckpt has 2 unexpected bytes after its body"]
        .assert_eq(&damaged(|b| b.extend_from_slice(&[0, 0])));
    expect!["checkpoint DIR/server.ckpt is not a FedSpine checkpoint (bad magic)"]
        .assert_eq(&damaged(|b| b[0] = b'{'));
    expect!["checkpoint DIR/server.ckpt is not a FedSpine checkpoint (bad magic)"]
        .assert_eq(&damaged(|b| *b = b"{\"round\": 1}".to_vec()));
    expect!["checkpoint DIR/server.ckpt has format version 2; this build reads version 1"]
        .assert_eq(&damaged(|b| b[8] = 2));
    expect!["checkpoint DIR/server.ckpt holds state schema 4; this build expects schema 3"]
        .assert_eq(&damaged(|b| b[12] = 4));
    expect!["checkpoint DIR/server.ckpt declares a 18446744073709551615-byte body, over the 17179869184-byte limit"]
        .assert_eq(&damaged(|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())));
}

#[test]
fn a_valid_container_with_the_wrong_state_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.ckpt");
    checkpoint::write_atomic(&path, SCHEMA, &vec![1u8, 2, 3]).unwrap();
    let err = checkpoint::read::<State>(&path, SCHEMA).unwrap_err();
    assert!(matches!(err, CheckpointError::Decode { .. }), "{err}");
    assert!(
        err.to_string().contains("other.ckpt: cannot decode state"),
        "{err}"
    );
}

#[test]
fn a_missing_directory_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("server.ckpt");
    let err = checkpoint::write_atomic(&path, SCHEMA, &state(1)).unwrap_err();
    assert!(
        err.to_string().contains("missing/.server.ckpt.tmp-"),
        "{err}"
    );
    let err = checkpoint::read::<State>(&path, SCHEMA).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("checkpoint {}: open failed", path.display())),
        "{err}"
    );
    assert_eq!(HEADER_BYTES, 56);
}
