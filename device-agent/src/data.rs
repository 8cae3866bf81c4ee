//! The bundled data sets, read from the asset cache: Moby-Dick chapters, State of the Union
//! addresses (with year, president and party from the file names) and the SpamAssassin corpus
//! (ham/spam labels from the folder names).

use std::path::{Path, PathBuf};

use crate::assets::{self, Asset, AssetError};

/// Errors reading a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn read(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn list_txt(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    v.sort();
    Ok(v)
}

/// A document of a text corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub id: String,
    pub text: String,
}

/// Moby-Dick chapter `n` (1-based).
pub fn moby_dick_chapter(n: usize) -> Result<Document, DataError> {
    let dir = assets::ensure(&assets::MOBY_DICK)?;
    let path = dir.join(format!("chapter_{n}.txt"));
    if !path.is_file() {
        return Err(DataError::Invalid(format!(
            "Moby-Dick has no chapter {n} (chapters 1-135)"
        )));
    }
    Ok(Document {
        id: format!("chapter_{n}"),
        text: read(&path)?,
    })
}

/// All Moby-Dick chapters in order.
pub fn moby_dick() -> Result<Vec<Document>, DataError> {
    (1..=135).map(moby_dick_chapter).collect()
}

/// One State of the Union address.
#[derive(Debug, Clone, PartialEq)]
pub struct Speech {
    pub year: u32,
    pub president: String,
    /// Party code from the file name (`r`, `d`, `w`, `f`, `dr`, `n`).
    pub party: String,
    pub text: String,
}

/// All State of the Union addresses, by year.
pub fn sotu() -> Result<Vec<Speech>, DataError> {
    let dir = assets::ensure(&assets::SOTU)?;
    let mut out = Vec::new();
    for p in list_txt(&dir)? {
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let parts: Vec<&str> = stem.split('_').collect();
        if parts.len() < 3 {
            continue;
        }
        let Ok(year) = parts[0].parse::<u32>() else {
            continue;
        };
        out.push(Speech {
            year,
            president: parts[1..parts.len() - 1].join(" "),
            party: parts[parts.len() - 1].to_string(),
            text: read(&p)?,
        });
    }
    if out.is_empty() {
        return Err(DataError::Invalid(format!(
            "no speeches found in {}",
            dir.display()
        )));
    }
    Ok(out)
}

/// One labelled e-mail.
#[derive(Debug, Clone, PartialEq)]
pub struct Email {
    pub id: String,
    pub spam: bool,
    /// Subject line and body (other headers dropped).
    pub text: String,
}

/// Keep the subject and the body of a raw RFC 822 message.
pub fn strip_headers(raw: &str) -> String {
    let (head, body) = match raw.find("\n\n") {
        Some(i) => (&raw[..i], &raw[i + 2..]),
        None => ("", raw),
    };
    let subject = head
        .lines()
        .find_map(|l| l.strip_prefix("Subject:"))
        .map(str::trim)
        .unwrap_or("");
    format!("Subject: {subject}\n{}", body.trim())
}

/// The SpamAssassin corpus: (folder, is_spam) for easy-ham-1/2, hard-ham-1, spam-1/2.
pub fn spam_assassin() -> Result<Vec<Email>, DataError> {
    let dir = assets::ensure(&assets::SPAM)?;
    let mut out = Vec::new();
    for (folder, spam) in [
        ("easy-ham-1", false),
        ("easy-ham-2", false),
        ("hard-ham-1", false),
        ("spam-1", true),
        ("spam-2", true),
    ] {
        for p in list_txt(&dir.join(folder))? {
            let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
            out.push(Email {
                id: format!("{folder}/{name}"),
                spam,
                text: strip_headers(&read(&p)?),
            });
        }
    }
    Ok(out)
}

/// Resolve a data-set name (for CLIs).
pub fn asset_for(name: &str) -> Result<Asset, AssetError> {
    Asset::by_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_dropped_but_subject_kept() {
        let raw = "From: a@b\nSubject: Win money now\nX-Spam: yes\n\nHello there.\nBye.\n";
        assert_eq!(
            strip_headers(raw),
            "Subject: Win money now\nHello there.\nBye."
        );
    }
}
