//! [`StateKeeper`]: how `join --state DIR` keeps the device's state on disk. It opens the
//! directory (loads the state, or starts one; a file it cannot use is an error unless the user
//! asked for a fresh start, and then it is moved aside, never deleted), and writes the state
//! atomically at each round's end (before the update is sent), after each upload, and when the
//! aggregator acknowledges or refuses the update. It reads the session's state through its
//! accessors and decides nothing about rounds.

use std::path::{Path, PathBuf};

use protocol::RoundId;

use super::{file, state_file, Fingerprint, LastRound, RoundStatus, SavedState, StateError};
use crate::model::Llama;
use crate::session::{AgentSession, DeviceState, UnackedUpdate};

/// Suffix of a state file moved aside by a fresh start.
pub const REPLACED_SUFFIX: &str = "old";

/// What opening a state directory found.
#[derive(Debug, Clone, PartialEq)]
pub enum Opened {
    /// No state file: the device starts dense (its first run).
    New,
    /// A state file of this device and model.
    Loaded {
        last_round: Option<(RoundId, RoundStatus)>,
    },
    /// A fresh start was asked for: the previous file was moved to `old`.
    Replaced { old: PathBuf },
}

/// The state directory of a running `join`.
#[derive(Debug)]
pub struct StateKeeper {
    /// Held open, locked, while the keeper lives: one agent per state directory.
    _lock: std::fs::File,
    path: PathBuf,
    fingerprint: Fingerprint,
    device_id: u64,
    model: crate::model::ModelConfig,
    last_round: Option<LastRound>,
}

/// What a restarted session resumes from.
#[derive(Debug)]
pub struct Resume {
    pub state: DeviceState,
    pub unacked: Option<UnackedUpdate>,
    pub opened: Opened,
}

impl StateKeeper {
    /// Opens (creating it, mode 0700) the state directory `dir` of device `device_id` holding
    /// `base`: removes temporary files a killed agent left, then loads the state file. A file
    /// that cannot be used (corrupt, truncated, another version, model or device) is an error,
    /// unless `fresh`: then it is moved aside (see [`aside_path`]) and the device starts dense.
    pub fn open(
        dir: &Path,
        base: &Llama,
        device_id: u64,
        fresh: bool,
    ) -> Result<(StateKeeper, Resume), StateError> {
        create_dir(dir)?;
        let lock = lock_dir(dir)?;
        let path = state_file(dir);
        file::remove_stale_temps(&path)?;
        let mut keeper = StateKeeper {
            _lock: lock,
            path: path.clone(),
            fingerprint: Fingerprint::of(base),
            device_id,
            model: base.config.clone(),
            last_round: None,
        };
        let dense = || DeviceState::fresh(base);
        if fresh && std::fs::symlink_metadata(&path).is_ok() {
            let old = aside_path(&path)?;
            std::fs::rename(&path, &old).map_err(file::io_err(&path, "move aside"))?;
            tracing::warn!(path = %path.display(), old = %old.display(), "fresh start asked for: the previous device state was moved aside");
            keeper.save_state(&dense(), None)?;
            return Ok((
                keeper,
                Resume {
                    state: dense(),
                    unacked: None,
                    opened: Opened::Replaced { old },
                },
            ));
        }
        match super::load(dir, base)? {
            None => {
                keeper.save_state(&dense(), None)?;
                Ok((
                    keeper,
                    Resume {
                        state: dense(),
                        unacked: None,
                        opened: Opened::New,
                    },
                ))
            }
            Some(saved) => {
                if saved.device_id != device_id {
                    return Err(StateError::WrongDevice {
                        path,
                        found: saved.device_id,
                        expected: device_id,
                    });
                }
                let unacked = saved.last_round.as_ref().and_then(|l| l.unacked.clone());
                let opened = Opened::Loaded {
                    last_round: saved
                        .last_round
                        .as_ref()
                        .map(|l| (l.round, l.status.clone())),
                };
                keeper.last_round = saved.last_round;
                Ok((
                    keeper,
                    Resume {
                        state: saved.device,
                        unacked,
                        opened,
                    },
                ))
            }
        }
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last round as saved.
    pub fn last_round(&self) -> Option<&LastRound> {
        self.last_round.as_ref()
    }

    fn save_state(
        &mut self,
        state: &DeviceState,
        unacked: Option<UnackedUpdate>,
    ) -> Result<u64, StateError> {
        if let Some(last) = &mut self.last_round {
            last.unacked = unacked.filter(|u| u.update.round == last.round);
        }
        let saved = SavedState {
            device_id: self.device_id,
            model: self.model.clone(),
            device: state.clone(),
            last_round: self.last_round.clone(),
        };
        file::write_atomic(&self.path, super::SCHEMA_VERSION, &self.fingerprint, &saved)
    }

    fn save(&mut self, session: &AgentSession) -> Result<u64, StateError> {
        self.save_state(session.state(), session.unacked_update())
    }

    /// A job of `round` ended: when the session produced its update (the round's result was
    /// not dropped), the new state and the update are saved, before the update is sent.
    /// Returns whether it saved.
    pub fn round_done(
        &mut self,
        session: &AgentSession,
        round: RoundId,
    ) -> Result<bool, StateError> {
        let Some(unacked) = session.unacked_update() else {
            return Ok(false);
        };
        if unacked.update.round != round {
            return Ok(false);
        }
        self.last_round = Some(LastRound {
            round,
            stats: unacked.update.stats.clone(),
            status: RoundStatus::Trained,
            unacked: None,
        });
        self.save(session)?;
        Ok(true)
    }

    /// The update of `round` went out (again, after a re-sent configuration, too); saves unless
    /// the aggregator already answered it.
    pub fn uploaded(&mut self, session: &AgentSession, round: RoundId) -> Result<bool, StateError> {
        self.mark(session, round, RoundStatus::Uploaded)
    }

    /// The aggregator acknowledged (`Ok`) or refused (`Err(reason)`) the update of `round`.
    pub fn answered(
        &mut self,
        session: &AgentSession,
        round: RoundId,
        answer: Result<(), String>,
    ) -> Result<bool, StateError> {
        let status = match answer {
            Ok(()) => RoundStatus::Acknowledged,
            Err(why) => RoundStatus::Refused(why),
        };
        self.mark(session, round, status)
    }

    fn mark(
        &mut self,
        session: &AgentSession,
        round: RoundId,
        status: RoundStatus,
    ) -> Result<bool, StateError> {
        let Some(last) = self.last_round.as_mut().filter(|l| l.round == round) else {
            return Ok(false);
        };
        let answered = matches!(
            last.status,
            RoundStatus::Acknowledged | RoundStatus::Refused(_)
        );
        if last.status == status || (status == RoundStatus::Uploaded && answered) {
            return Ok(false);
        }
        last.status = status;
        self.save(session)?;
        Ok(true)
    }
}

/// The file a running agent holds locked in its state directory.
pub const LOCK_FILE: &str = "device-state.lock";

/// Takes `dir`'s lock, or says that another agent holds it: two agents on one directory would
/// remove each other's temporary files and overwrite each other's state.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StateError> {
    let path = dir.join(LOCK_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let f = options
        .open(&path)
        .map_err(file::io_err(&path, "open lock"))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(StateError::InUse { path }),
        Err(std::fs::TryLockError::Error(e)) => Err(file::io_err(&path, "lock")(e)),
    }
}

/// Most states moved aside by fresh starts that are kept side by side.
const MAX_ASIDE: u32 = 1000;

/// Where a fresh start moves the state at `path`: `device-state.bin.old`, or the first of
/// `.old.2`, `.old.3`, ... that does not exist, so no earlier state moved aside is replaced.
fn aside_path(path: &Path) -> Result<PathBuf, StateError> {
    let free = |p: &Path| matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    let first = path.with_extension(format!("bin.{REPLACED_SUFFIX}"));
    if free(&first) {
        return Ok(first);
    }
    (2..=MAX_ASIDE)
        .map(|k| path.with_extension(format!("bin.{REPLACED_SUFFIX}.{k}")))
        .find(|p| free(p))
        .ok_or_else(|| StateError::Invalid {
            path: path.to_path_buf(),
            detail: format!(
                "{MAX_ASIDE} earlier states are already moved aside beside it: remove some \
                 before another fresh start"
            ),
        })
}

/// Creates the state directory (owner-only on Unix) or checks that `dir` is one that other
/// users cannot write into.
fn create_dir(dir: &Path) -> Result<(), StateError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = m.permissions().mode() & 0o7777;
                if mode & 0o002 != 0 {
                    return Err(StateError::OpenDirectory {
                        path: dir.to_path_buf(),
                        mode,
                    });
                }
            }
            return Ok(());
        }
        Ok(_) => {
            return Err(StateError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(file::io_err(dir, "stat")(e))
        }
        Err(_) => {}
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(file::io_err(dir, "create directory"))
}
