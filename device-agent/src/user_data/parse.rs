//! Reading the user's files into records: the format of each file (by extension, and for
//! JSONL by the keys of its first record), and one record per document or JSONL line, with
//! errors that name the file and the 1-based line.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::UserDataError;

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name in the chat template.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// What one record holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordBody {
    /// Causal-LM text (a plain-text file, or a `{"text"}` line).
    Text(String),
    /// A conversation (a `{"messages"}` line, or an `{"instruction", "input", "output"}` line
    /// turned into a user and an assistant message).
    Chat(Vec<Message>),
    /// A `{"text", "label"}` line.
    Labelled { text: String, label: String },
}

/// A record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub path: PathBuf,
    /// 1-based line of a JSONL record; 0 for a whole plain-text file.
    pub line: usize,
    pub body: RecordBody,
}

/// The format of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    PlainText,
    JsonlText,
    JsonlChat,
    JsonlInstruction,
    JsonlClassification,
}

impl Format {
    /// How the format is named in error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Format::PlainText => "plain text",
            Format::JsonlText => "text records {\"text\"}",
            Format::JsonlChat => "chat records {\"messages\"}",
            Format::JsonlInstruction => {
                "instruction records {\"instruction\", \"input\", \"output\"}"
            }
            Format::JsonlClassification => "classification records {\"text\", \"label\"}",
        }
    }

    /// Keys a record of this format must have, and keys it may have.
    fn keys(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Format::PlainText => (&[], &[]),
            Format::JsonlText => (&["text"], &[]),
            Format::JsonlChat => (&["messages"], &[]),
            Format::JsonlInstruction => (&["instruction", "output"], &["input"]),
            Format::JsonlClassification => (&["text", "label"], &[]),
        }
    }

    /// The format a JSONL file's first record announces.
    fn detect(obj: &Map<String, Value>) -> Option<Format> {
        if obj.contains_key("messages") {
            Some(Format::JsonlChat)
        } else if obj.contains_key("instruction") {
            Some(Format::JsonlInstruction)
        } else if obj.contains_key("label") {
            Some(Format::JsonlClassification)
        } else if obj.contains_key("text") {
            Some(Format::JsonlText)
        } else {
            None
        }
    }
}

/// The files behind `path`: the file itself, or every file of a directory sorted by name
/// (names starting with a dot are skipped).
pub fn list_files(path: &Path) -> Result<Vec<PathBuf>, UserDataError> {
    let io = |source| UserDataError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        let bytes = data_file_len(path)?;
        total_within(path, bytes)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut total = 0u64;
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            return Err(UserDataError::File {
                path: p,
                what: "is a directory; data directories are read one level deep".into(),
            });
        }
        total = total.saturating_add(data_file_len(&p)?);
        total_within(path, total)?;
        files.push(p);
    }
    files.sort();
    if files.is_empty() {
        return Err(UserDataError::File {
            path: path.to_path_buf(),
            what: "the directory holds no data files".into(),
        });
    }
    Ok(files)
}

/// Largest data file read: a quarter of a gigabyte of text is some 60 million tokens, far more
/// than a device trains on in many rounds.
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Largest sum of the data files read.
pub const MAX_TOTAL_BYTES: u64 = 512 << 20;

/// The length of the data file at `path`, which must be a regular file (through links) of at
/// most [`MAX_FILE_BYTES`].
fn data_file_len(path: &Path) -> Result<u64, UserDataError> {
    let meta = std::fs::metadata(path).map_err(|source| UserDataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(kind) = crate::local_file::irregular_kind(&meta.file_type()) {
        return Err(UserDataError::File {
            path: path.to_path_buf(),
            what: format!("is {kind}, not a data file"),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(UserDataError::File {
            path: path.to_path_buf(),
            what: format!(
                "{} bytes, over the {MAX_FILE_BYTES}-byte limit for one data file: split it",
                meta.len()
            ),
        });
    }
    Ok(meta.len())
}

/// Refuses data files of `total` bytes in all under `path` beyond [`MAX_TOTAL_BYTES`].
fn total_within(path: &Path, total: u64) -> Result<(), UserDataError> {
    if total > MAX_TOTAL_BYTES {
        return Err(UserDataError::File {
            path: path.to_path_buf(),
            what: format!(
                "the data files hold over {MAX_TOTAL_BYTES} bytes in all: train on a part of them"
            ),
        });
    }
    Ok(())
}

/// Read one file: its format and its records.
pub fn read_file(path: &Path) -> Result<(Format, Vec<Record>), UserDataError> {
    let file_err = |what: String| UserDataError::File {
        path: path.to_path_buf(),
        what,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let io = |source| UserDataError::Io {
        path: path.to_path_buf(),
        source,
    };
    data_file_len(path)?;
    // Bounded again while reading: the file may have grown since it was listed.
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(path).map_err(io)?, MAX_FILE_BYTES + 1),
        &mut bytes,
    )
    .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(file_err(format!(
            "grew past the {MAX_FILE_BYTES}-byte limit for one data file while it was read"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        UserDataError::Record {
            path: path.to_path_buf(),
            line,
            what: "not valid UTF-8".into(),
        }
    })?;
    match ext.as_deref() {
        Some("txt" | "md") => {
            if text.trim().is_empty() {
                return Err(file_err("the file is empty".into()));
            }
            let record = Record {
                path: path.to_path_buf(),
                line: 0,
                body: RecordBody::Text(text),
            };
            Ok((Format::PlainText, vec![record]))
        }
        Some("jsonl") => read_jsonl(path, &text),
        _ => Err(file_err(
            "unsupported file type (use .txt or .md for plain text, .jsonl for records)".into(),
        )),
    }
}

fn read_jsonl(path: &Path, text: &str) -> Result<(Format, Vec<Record>), UserDataError> {
    let mut format = None;
    let mut records = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let err = |what: String| UserDataError::Record {
            path: path.to_path_buf(),
            line,
            what,
        };
        let value: Value =
            serde_json::from_str(raw).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(err("a record must be a JSON object".into()));
        };
        let f = match format {
            Some(f) => f,
            None => {
                let f = Format::detect(&obj).ok_or_else(|| {
                    err(format!(
                        "unknown record keys {:?}: expected {{\"text\"}}, {{\"messages\"}}, \
                         {{\"instruction\", \"input\", \"output\"}} or {{\"text\", \"label\"}}",
                        obj.keys().collect::<Vec<_>>()
                    ))
                })?;
                format = Some(f);
                f
            }
        };
        let body = parse_record(f, &obj).map_err(err)?;
        records.push(Record {
            path: path.to_path_buf(),
            line,
            body,
        });
    }
    match format {
        Some(f) => Ok((f, records)),
        None => Err(UserDataError::File {
            path: path.to_path_buf(),
            what: "the file is empty (no records)".into(),
        }),
    }
}

/// One record of a file whose format is `f`; the error says what is wrong with it.
fn parse_record(f: Format, obj: &Map<String, Value>) -> Result<RecordBody, String> {
    let (required, optional) = f.keys();
    for k in obj.keys() {
        if !required.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
            return Err(format!(
                "unexpected key \"{k}\": this file holds {} (from its first record)",
                f.describe()
            ));
        }
    }
    for k in required {
        if !obj.contains_key(*k) {
            return Err(format!(
                "missing \"{k}\": this file holds {} (from its first record)",
                f.describe()
            ));
        }
    }
    let string = |o: &Map<String, Value>, k: &str| -> Result<String, String> {
        match o.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("\"{k}\" must be a string, found {other}")),
            None => Err(format!("missing \"{k}\"")),
        }
    };
    Ok(match f {
        Format::PlainText | Format::JsonlText => RecordBody::Text(string(obj, "text")?),
        Format::JsonlClassification => RecordBody::Labelled {
            text: string(obj, "text")?,
            label: string(obj, "label")?,
        },
        Format::JsonlInstruction => {
            let mut user = string(obj, "instruction")?;
            if obj.contains_key("input") {
                let input = string(obj, "input")?;
                if !input.trim().is_empty() {
                    user.push_str("\n\n");
                    user.push_str(&input);
                }
            }
            RecordBody::Chat(vec![
                Message {
                    role: Role::User,
                    content: user,
                },
                Message {
                    role: Role::Assistant,
                    content: string(obj, "output")?,
                },
            ])
        }
        Format::JsonlChat => {
            let Some(Value::Array(list)) = obj.get("messages") else {
                return Err("\"messages\" must be an array of {\"role\", \"content\"}".into());
            };
            let mut messages = Vec::with_capacity(list.len());
            for (k, m) in list.iter().enumerate() {
                let at = |what: String| format!("message {}: {what}", k + 1);
                let Value::Object(m) = m else {
                    return Err(at("must be an object {\"role\", \"content\"}".into()));
                };
                if let Some(extra) = m.keys().find(|k| *k != "role" && *k != "content") {
                    return Err(at(format!("unexpected key \"{extra}\"")));
                }
                let role = match string(m, "role").map_err(at)?.as_str() {
                    "system" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => {
                        return Err(at(format!(
                            "unknown role \"{other}\" (system, user, assistant)"
                        )))
                    }
                };
                if role == Role::System && k > 0 {
                    return Err(at("a system message may only come first".into()));
                }
                messages.push(Message {
                    role,
                    content: string(m, "content").map_err(at)?,
                });
            }
            if !messages.iter().any(|m| m.role == Role::Assistant) {
                return Err("no assistant message: there is nothing to learn".into());
            }
            RecordBody::Chat(messages)
        }
    })
}
