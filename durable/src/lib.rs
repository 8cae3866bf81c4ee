//! Crash-safe replacement of one file, shared by the aggregator's checkpoints and the device
//! agent's state file (the two never link each other; each keeps its own container format on
//! top of this).
//!
//! [`replace`] writes the new contents to a temporary file next to the target, fsyncs it,
//! renames it over the target and fsyncs the directory, so a crash at any moment leaves either
//! the old file or the new one, never a torn one. The temporary file of `dir/NAME` is
//! `dir/.NAME.tmp.<pid>.<n>` (`n` a per-process counter, so two writers never share one),
//! created with `create_new` (`O_CREAT | O_EXCL`: any existing entry, a symbolic link included,
//! is refused without being followed) and mode 0600 on Unix (the umask can only narrow it, and
//! the rename keeps it, so the file stays owner-only). A taken name is skipped for the next
//! one, a few times ([`TEMP_ATTEMPTS`]), then the write fails naming it. Any error after the
//! temporary file exists removes it and leaves the target as it was (only when the last step,
//! the directory fsync, fails is the new file already in place, perhaps not yet durable).
//!
//! A killed writer can leave its temporary file behind: [`remove_stale_temps`] removes those of
//! one target, to be called when the owner opens its directory and before it reads the target.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How many temporary-file names a write tries before it gives up.
pub const TEMP_ATTEMPTS: u32 = 8;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A failed file operation: which file, which step, and the system's error.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed on {path}: {source}")]
pub struct IoError {
    pub path: PathBuf,
    /// The step, e.g. `create temporary file`, `fsync`, `rename into place`.
    pub op: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// The points of [`replace`] its caller may act at (the aggregator's tests pause there to be
/// killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The temporary file is written and fsynced, not yet renamed.
    TempWritten,
    /// The new file is in place and its directory fsynced.
    Renamed,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> IoError + 'a {
    move |source| IoError {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The directory `path` lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.NAME.tmp`: what every temporary file of `path` starts with.
fn temp_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    format!(".{name}.tmp")
}

/// A fresh temporary file next to `path`: exclusively created, owner read/write only.
fn create_temp(path: &Path) -> Result<(File, PathBuf), IoError> {
    let stem = temp_stem(path);
    let pid = std::process::id();
    let mut attempt = 0;
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!("{stem}.{pid}.{n}"));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(&tmp) {
            Ok(file) => return Ok((file, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                attempt += 1;
                tracing::warn!(path = %tmp.display(), "temporary file name taken; trying another");
                if attempt >= TEMP_ATTEMPTS {
                    return Err(io_err(&tmp, "create temporary file")(e));
                }
            }
            Err(e) => return Err(io_err(&tmp, "create temporary file")(e)),
        }
    }
}

/// Fsyncs the directory `path` lives in, so that a rename or removal in it is durable.
#[cfg(unix)]
pub fn sync_parent_dir(path: &Path) -> Result<(), IoError> {
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

/// Fsyncs the directory `path` lives in (a no-op where directories cannot be opened).
#[cfg(not(unix))]
pub fn sync_parent_dir(_path: &Path) -> Result<(), IoError> {
    Ok(())
}

/// Atomically replaces `path` with the concatenation of `parts` (see the crate docs); `at`
/// is called at each [`Step`]. Returns the bytes written. On an error `path` holds what it
/// held before and the temporary file is gone.
pub fn replace(path: &Path, parts: &[&[u8]], mut at: impl FnMut(Step)) -> Result<u64, IoError> {
    let (file, tmp) = create_temp(path)?;
    let result = (|mut file: File| {
        for part in parts {
            file.write_all(part).map_err(io_err(&tmp, "write"))?;
        }
        file.sync_all().map_err(io_err(&tmp, "fsync"))?;
        drop(file);
        at(Step::TempWritten);
        fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))?;
        sync_parent_dir(path)?;
        at(Step::Renamed);
        Ok(())
    })(file);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    Ok(parts.iter().map(|p| p.len() as u64).sum())
}

/// Removes the temporary files a killed writer of `path` left behind and returns them,
/// sorted: `.NAME.tmp.<anything>`, and `.NAME.tmp-<anything>` (the aggregator's naming before
/// the counter). Only files and symbolic links go (a link itself, never its target); anything
/// else with such a name is left in place and logged. Call it only while nothing else writes
/// `path`. A missing directory has nothing to remove.
pub fn remove_stale_temps(path: &Path) -> Result<Vec<PathBuf>, IoError> {
    let dir = parent_dir(path);
    let stem = temp_stem(path);
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.map_err(io_err(dir, "list directory"))?,
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir, "list directory"))?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&stem)) else {
            continue;
        };
        if !(rest.starts_with('.') || rest.starts_with('-')) {
            continue;
        }
        let stale = entry.path();
        let kind = fs::symlink_metadata(&stale)
            .map_err(io_err(&stale, "stat"))?
            .file_type();
        if !(kind.is_file() || kind.is_symlink()) {
            tracing::warn!(path = %stale.display(), "not a file; left in place");
            continue;
        }
        fs::remove_file(&stale).map_err(io_err(&stale, "remove stale temporary file"))?;
        tracing::warn!(path = %stale.display(), "removed a temporary file a killed writer left");
        removed.push(stale);
    }
    if !removed.is_empty() {
        sync_parent_dir(path)?;
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replace_writes_the_parts_and_calls_each_step_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        fs::write(&path, b"old").unwrap();
        let mut steps = Vec::new();
        let n = replace(&path, &[b"he", b"", b"llo"], |s| {
            // At the first step the target still holds the old contents.
            if s == Step::TempWritten {
                assert_eq!(fs::read(&path).unwrap(), b"old");
            }
            steps.push(s);
        })
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(steps, [Step::TempWritten, Step::Renamed]);
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        assert_eq!(names(dir.path()), ["state"], "no temporary file is left");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        }
    }

    #[test]
    fn a_failed_rename_keeps_the_old_file_and_removes_the_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory at the target's name: the rename over it fails.
        let path = dir.path().join("target");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"keep").unwrap();
        let mut steps = Vec::new();
        let err = replace(&path, &[b"new"], |s| steps.push(s)).unwrap_err();
        assert_eq!(err.op, "rename into place", "{err}");
        assert_eq!(err.path, path);
        assert!(err.to_string().starts_with("rename into place failed on "));
        assert_eq!(
            steps,
            [Step::TempWritten],
            "it never reached the rename's end"
        );
        assert_eq!(names(dir.path()), ["target"]);
        assert_eq!(fs::read(path.join("inside")).unwrap(), b"keep");
    }

    #[cfg(unix)]
    #[test]
    fn taken_temporary_names_are_skipped_then_refused_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        // Links at the next 4,096 names this process can pick (the other tests running beside
        // this one take only a few): the write tries TEMP_ATTEMPTS of them, then gives up.
        let pid = std::process::id();
        let next = TEMP_COUNTER.load(Ordering::Relaxed);
        for n in next..next + 4096 {
            let link = dir.path().join(format!(".state.tmp.{pid}.{n}"));
            std::os::unix::fs::symlink(&victim, link).unwrap();
        }
        let err = replace(&path, &[b"new"], |_| {}).unwrap_err();
        assert_eq!(err.op, "create temporary file");
        assert_eq!(err.source.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(!path.exists());
        let removed = remove_stale_temps(&path).unwrap();
        assert_eq!(removed.len(), 4096);
        assert_eq!(
            names(dir.path()),
            ["victim"],
            "the links went, their target stayed"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn the_sweep_takes_only_this_targets_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        for n in [
            ".state.tmp.4000000.7",
            ".state.tmp-4000001",
            ".state.tmpfile",
            ".other.tmp.1.1",
            "state",
        ] {
            fs::write(dir.path().join(n), b"x").unwrap();
        }
        fs::create_dir(dir.path().join(".state.tmp.dir")).unwrap();
        let removed: Vec<_> = remove_stale_temps(&path)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(removed, [".state.tmp-4000001", ".state.tmp.4000000.7"]);
        assert_eq!(
            names(dir.path()),
            [
                ".other.tmp.1.1",
                ".state.tmp.dir",
                ".state.tmpfile",
                "state"
            ]
        );
        assert!(remove_stale_temps(&dir.path().join("absent").join("state"))
            .unwrap()
            .is_empty());
    }
}
