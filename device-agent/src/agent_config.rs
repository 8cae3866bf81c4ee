//! The agent's config file: `device-agent join --config FILE` reads a TOML table whose keys are
//! `join`'s long flag names (`aggregator = "10.0.0.2:7443"`, `state = "/var/lib/fedspine"`,
//! `fresh-state = true`; `_` and `-` alike) and turns it into those flags, placed before the
//! command line's own, so a flag given on the command line overrides the file. Keys that are no
//! `join` flag, nested tables and files over [`MAX_CONFIG_BYTES`] are refused with the file and
//! the key named.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Largest config file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("--config needs a file path")]
    MissingPath,
}

/// The flags a config file stands for, as command-line words (`--key`, `value`, ...), in the
/// file's key order. `known` holds the long names `join` accepts (with hyphens).
pub fn flags_from_toml(
    text: &str,
    path: &Path,
    known: &[String],
) -> Result<Vec<OsString>, AgentConfigError> {
    let bad = |reason: String| AgentConfigError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let flag = key.replace('_', "-");
        if flag == "config" || !known.contains(&flag) {
            return Err(bad(format!(
                "unknown key '{key}': `join` has no --{flag} flag"
            )));
        }
        let scalar = |v: &toml::Value| -> Result<Option<String>, AgentConfigError> {
            Ok(match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                toml::Value::Boolean(true) => None,
                other => {
                    return Err(bad(format!(
                        "key '{key}': a {} is not a flag value (use a string, number or true)",
                        other.type_str()
                    )))
                }
            })
        };
        match value {
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for v in items {
                    out.push(OsString::from(format!("--{flag}")));
                    if let Some(s) = scalar(v)? {
                        out.push(s.into());
                    }
                }
            }
            v => {
                out.push(OsString::from(format!("--{flag}")));
                if let Some(s) = scalar(v)? {
                    out.push(s.into());
                }
            }
        }
    }
    Ok(out)
}

/// `args` (a whole command line) with `join --config FILE` replaced by the file's flags, put
/// right after `join` so the command line's own flags come later and win. Command lines
/// without `join --config` come back unchanged.
pub fn expand(args: Vec<OsString>, known: &[String]) -> Result<Vec<OsString>, AgentConfigError> {
    let Some(join) = args.iter().position(|a| a == "join") else {
        return Ok(args);
    };
    let mut rest: Vec<OsString> = args[join + 1..].to_vec();
    let mut path = None;
    let mut i = 0;
    while i < rest.len() {
        let word = rest[i].to_string_lossy().into_owned();
        if word == "--config" {
            let p = rest
                .get(i + 1)
                .ok_or(AgentConfigError::MissingPath)?
                .clone();
            path = Some(PathBuf::from(p));
            rest.drain(i..i + 2);
        } else if let Some(p) = word.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
            rest.remove(i);
        } else {
            i += 1;
        }
    }
    let Some(path) = path else {
        return Ok(args);
    };
    let io = |source| AgentConfigError::Io {
        path: path.clone(),
        source,
    };
    let len = std::fs::metadata(&path).map_err(io)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(AgentConfigError::Invalid {
            path,
            reason: format!("{len} bytes (at most {MAX_CONFIG_BYTES})"),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(io)?;
    let flags = flags_from_toml(&text, &path, known)?;
    let mut out: Vec<OsString> = args[..=join].to_vec();
    out.extend(flags);
    out.extend(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<String> {
        [
            "aggregator",
            "id",
            "pki",
            "state",
            "fresh-state",
            "seq-len",
            "data",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn words(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn a_file_becomes_flags_before_the_command_line_s_own() {
        let tmp = tempfile::Builder::new()
            .prefix("fedspine-agent-config-")
            .tempdir()
            .unwrap();
        let f = tmp.path().join("agent.toml");
        std::fs::write(
            &f,
            "aggregator = \"10.0.0.2:7443\"\nid = 3\nseq_len = 64\nfresh-state = false\nstate = \"/s\"\n",
        )
        .unwrap();
        let args: Vec<OsString> = [
            "device-agent",
            "join",
            "--config",
            f.to_str().unwrap(),
            "--id",
            "4",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let got = words(&expand(args, &known()).unwrap());
        assert_eq!(
            got,
            [
                "device-agent",
                "join",
                "--aggregator",
                "10.0.0.2:7443",
                "--id",
                "3",
                "--seq-len",
                "64",
                "--state",
                "/s",
                "--id",
                "4"
            ]
        );
        // No --config: unchanged.
        let plain: Vec<OsString> = ["device-agent", "join", "--id", "1"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(expand(plain.clone(), &known()).unwrap(), plain);
    }

    #[test]
    fn unknown_keys_tables_and_missing_files_are_refused_by_name() {
        let p = Path::new("/etc/agent.toml");
        let e = flags_from_toml("agregator = \"x\"\n", p, &known())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/agent.toml") && e.contains("agregator"),
            "{e}"
        );
        let e = flags_from_toml("[state]\nx = 1\n", p, &known())
            .unwrap_err()
            .to_string();
        assert!(e.contains("state") && e.contains("table"), "{e}");
        let e = flags_from_toml("id = [1, {a = 2}]\n", p, &known())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'id'"), "{e}");
        let e = flags_from_toml("id = \n", p, &known())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/agent.toml"), "{e}");
        let args: Vec<OsString> = [
            "device-agent",
            "join",
            "--config",
            "/nonexistent/agent.toml",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let e = expand(args, &known()).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/agent.toml"), "{e}");
        let args: Vec<OsString> = ["device-agent", "join", "--config"]
            .iter()
            .map(OsString::from)
            .collect();
        assert!(matches!(
            expand(args, &known()),
            Err(AgentConfigError::MissingPath)
        ));
    }
}
