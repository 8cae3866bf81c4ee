//! Checkpoint tests: round trip, atomic replacement, every corruption refused by name, and
//! crash consistency: exclusive owner-only temporary files that never follow a planted link,
//! stale temporary files removed, a failed write (a real "file too large") reported with the
//! file named while the previous checkpoint stays loadable bit for bit.

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

/// A checksummed body whose string length claims 2^61 bytes (as a crafted file, not
/// corruption, would hold) is a decode error: the decoder allocates a string before it reads
/// it, so its limit, not the body's length, bounds that allocation.
#[test]
fn a_string_length_past_any_body_is_refused_without_allocating_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("liar.ckpt");
    // 2^61 is encoded exactly as a string of that length's prefix.
    checkpoint::write_atomic(&path, SCHEMA, &(1u64 << 61)).unwrap();
    let err = checkpoint::read::<String>(&path, SCHEMA).unwrap_err();
    assert!(matches!(err, CheckpointError::Decode { .. }), "{err}");
    assert!(
        err.to_string().contains("liar.ckpt: cannot decode state"),
        "{err}"
    );
}

#[test]
fn a_missing_directory_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("server.ckpt");
    let err = checkpoint::write_atomic(&path, SCHEMA, &state(1)).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("missing/.server.ckpt.tmp.{}.", std::process::id())),
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

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[cfg(unix)]
#[test]
fn checkpoints_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ckpt");
    // An older, world-readable checkpoint is replaced by an owner-only one.
    fs::write(&path, b"old").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    write(&path, &state(1));
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[cfg(unix)]
#[test]
fn a_planted_symlink_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ckpt");
    write(&path, &state(1));
    let good = fs::read(&path).unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    // Links at every temporary name this process could pick (the counter is process-wide,
    // and this test binary writes far fewer checkpoints than this).
    let pid = std::process::id();
    for n in 0..4096 {
        let link = dir.path().join(format!(".server.ckpt.tmp.{pid}.{n}"));
        std::os::unix::fs::symlink(&victim, link).unwrap();
    }
    let err = checkpoint::write_atomic(&path, SCHEMA, &state(2)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("/.server.ckpt.tmp.{pid}."))
            && text.contains("create temporary file failed")
            && text.contains("exists"),
        "{text}"
    );
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(fs::read(&path).unwrap(), good);
    // Cleanup at start removes the links themselves, never their target.
    let removed = checkpoint::remove_stale_temps(&path).unwrap();
    assert_eq!(removed.len(), 4096);
    assert_eq!(names(dir.path()), ["server.ckpt", "victim"]);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    // A link at the checkpoint's own name is replaced, not written through.
    fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    write(&path, &state(2));
    assert!(!fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(checkpoint::read::<State>(&path, SCHEMA).unwrap(), state(2));
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn a_write_killed_half_way_leaves_the_last_good_checkpoint_and_its_temp_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ckpt");
    write(&path, &state(1));
    let good = fs::read(&path).unwrap();
    // What a crash mid-write leaves: a temporary file with the first half of the next state
    // (from another, dead process), and one of the old `-pid` naming.
    let other = dir.path().join("other.ckpt");
    write(&other, &state(2));
    let next = fs::read(&other).unwrap();
    fs::remove_file(&other).unwrap();
    fs::write(
        dir.path().join(".server.ckpt.tmp.4000000.7"),
        &next[..next.len() / 2],
    )
    .unwrap();
    fs::write(dir.path().join(".server.ckpt.tmp-4000001"), b"").unwrap();
    // Names that are not ours stay.
    fs::write(dir.path().join(".server.ckpt.tmpfile"), b"keep").unwrap();
    fs::create_dir(dir.path().join(".server.ckpt.tmp.dir")).unwrap();
    let removed = checkpoint::remove_stale_temps(&path).unwrap();
    let removed: Vec<_> = removed
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        removed,
        [".server.ckpt.tmp-4000001", ".server.ckpt.tmp.4000000.7"]
    );
    assert_eq!(
        names(dir.path()),
        [
            ".server.ckpt.tmp.dir",
            ".server.ckpt.tmpfile",
            "server.ckpt"
        ]
    );
    // Resume reads the last good checkpoint, bit for bit.
    assert_eq!(fs::read(&path).unwrap(), good);
    assert_eq!(checkpoint::read::<State>(&path, SCHEMA).unwrap(), state(1));
    assert!(
        checkpoint::remove_stale_temps(&dir.path().join("nothing-here").join("x.ckpt"))
            .unwrap()
            .is_empty()
    );
}

const FSIZE_CHILD: &str = "FEDSPINE_CHECKPOINT_FSIZE_CHILD";

/// A state far over the child's file size limit.
fn big_state() -> State {
    let mut s = state(2);
    s.devices = (0..20_000).map(|i| (i, format!("device-{i:08}"))).collect();
    s
}

/// A real failed write: this test runs itself again in a child process whose file size limit
/// (`ulimit -f`, with SIGXFSZ ignored so the write returns EFBIG instead of killing it) is far
/// below the new checkpoint. The child's write must fail naming the file; the parent then
/// checks that the previous checkpoint is intact and no temporary file is left.
#[cfg(unix)]
#[test]
fn a_failed_write_is_reported_and_the_previous_checkpoint_survives() {
    if let Some(dir) = std::env::var_os(FSIZE_CHILD) {
        let path = Path::new(&dir).join("server.ckpt");
        let err = checkpoint::write_atomic(&path, SCHEMA, &big_state()).unwrap_err();
        println!("\nCHILD-ERROR {err}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ckpt");
    write(&path, &state(1));
    let good = fs::read(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64 && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args([
            "--exact",
            "a_failed_write_is_reported_and_the_previous_checkpoint_survives",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FSIZE_CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CHILD-ERROR "))
        .unwrap_or_else(|| panic!("no error from the child:\n{stdout}"));
    let tmp = format!("{}/.server.ckpt.tmp.", dir.path().display());
    assert!(
        line.starts_with(&format!("checkpoint {tmp}"))
            && line.contains(": write failed: File too large"),
        "{line}"
    );
    // The previous checkpoint is untouched and loads; the temporary file is gone.
    assert_eq!(fs::read(&path).unwrap(), good);
    assert_eq!(checkpoint::read::<State>(&path, SCHEMA).unwrap(), state(1));
    assert_eq!(names(dir.path()), ["server.ckpt"]);
    // Without the limit the same state is written.
    write(&path, &big_state());
    assert_eq!(
        checkpoint::read::<State>(&path, SCHEMA).unwrap(),
        big_state()
    );
}
