//! Tests of the device state directory: a real round on the tiny model saved and resumed (a
//! configuration re-sent for a saved round is answered with the saved update, not trained
//! again; a round killed mid-training trains again from the saved state), and every way a state
//! file can be unusable (corrupt, truncated, extended, another version, model or device, not a
//! state file) giving an error that names the file, never a dense start.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use protocol::{
    Ack, Arm, Capabilities, DeviceId, GlobalSlice, KeptIndices, Message, RoundConfig, RoundId,
    Timestamp, Welcome, PROTOCOL_VERSION,
};

use super::keeper::{Opened, StateKeeper};
use super::*;
use crate::cost::PrunedModel;
use crate::job::{run_job, LocalData};
use crate::prune::HeldModel;
use crate::prune::{Criterion, PruneConfig};
use crate::session::{AgentCommand, AgentConfig, AgentEvent, AgentSession, RoundLimits};
use crate::wire;
use crate::workload::LmShard;

/// The tiny test model of `join --model tiny` (4 blocks, vocab 256, d_model 64; seed 7).
fn tiny_model(device: &Device) -> Llama {
    Llama::random(
        ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true),
        7,
        device,
    )
}

/// Windows of 16 tokens (plus the target) following a fixed rule, something to learn.
fn rule_shard() -> LmShard {
    let window = |i: u32| -> Vec<u32> { (0..17).map(|t| (i * 7 + t * 37 + 11) % 256).collect() };
    LmShard {
        seq_len: 16,
        train: (0..16).map(window).collect(),
        test: (16..20).map(window).collect(),
    }
}

/// A fresh, empty directory for one test, removed when dropped (also when the test fails: the
/// export test writes hundreds of MB).
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fedspine-state-test-{name}-"))
        .tempdir()
        .unwrap()
}

fn agent(base: &Llama) -> AgentConfig {
    AgentConfig {
        device_id: DeviceId(3),
        capabilities: Capabilities {
            ram_bytes: 64 << 30,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
        criterion: Criterion::LoraGradient,
        prune: PruneConfig::for_layers(base.config.n_layers()),
        min_prune_events: 8,
        f16_updates: false,
        costs: Arc::new(PrunedModel {
            dense: base.config.clone(),
            seq_len: 16,
        }),
        limits: RoundLimits::default(),
        keep_adapter: true,
    }
}

/// A session as `join` builds it from an opened state directory, connected and welcomed.
fn session(base: &Llama, resume: super::keeper::Resume) -> AgentSession {
    let mut s = AgentSession::resume(agent(base), resume.state, resume.unacked);
    s.handle(Timestamp(0), AgentEvent::Connected);
    s.handle(
        Timestamp(0),
        AgentEvent::Message {
            msg: Message::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                device_id: DeviceId(3),
                model: wire::dims_of(&base.config),
                lora_alpha: 16.0,
                heartbeat_interval_ms: 0,
            }),
            bytes: 100,
        },
    );
    s
}

/// Round `round`'s configuration with a global slice (rank 4, cut for `kept`), as the
/// aggregator sends (and re-sends) it.
fn config(base: &Llama, round: u64, kept: &KeptIndices) -> AgentEvent {
    let mut cfg = base.config.clone();
    cfg.blocks = kept.shapes(&base.config);
    let global = crate::lora::Adapter::new(&cfg, 4, 16.0, 5, &base.device);
    AgentEvent::Message {
        msg: Message::RoundConfig(RoundConfig {
            round: RoundId(round),
            arm: Arm {
                prune_ratio: 0.2,
                rank: 4,
            },
            global: Some(GlobalSlice {
                adapter: wire::adapter_to_wire(4, 16.0, global.to_host(), false),
                kept: kept.clone(),
                filled_rank: 4,
            }),
            deadline_ms: 600_000,
            local_steps: 6,
            prune_interval_steps: 2,
            learning_rate: 0.01,
            batch_size: 2,
            seed: 40 + round,
            target_sparsity: None,
            options: Default::default(),
        }),
        bytes: 1000,
    }
}

/// Runs the `Train` command among `cmds` on the tiny model, as a driver does.
fn train(base: &Llama, cmds: Vec<AgentCommand>) -> crate::session::JobOutcome {
    let (job, state) = cmds
        .into_iter()
        .find_map(|c| match c {
            AgentCommand::Train { job, state } => Some((job, state)),
            _ => None,
        })
        .expect("the session asked for training");
    let data = LocalData::Lm(rule_shard());
    let held = HeldModel::sliced(base, &state.kept).unwrap();
    run_job(&job, &state, held, &data, &agent(base), |_| true)
        .outcome
        .expect("the round trains")
}

fn sent_update(cmds: &[AgentCommand]) -> Option<&protocol::Update> {
    cmds.iter().find_map(|c| match c {
        AgentCommand::Send(Message::Update(u)) => Some(u),
        _ => None,
    })
}

fn trains(cmds: &[AgentCommand]) -> usize {
    cmds.iter()
        .filter(|c| matches!(c, AgentCommand::Train { .. }))
        .count()
}

#[test]
fn a_saved_round_is_resumed_answered_again_and_never_trained_twice() {
    let base = tiny_model(&Device::flex());
    let tmp_dir = temp_dir("resume");
    let dir = tmp_dir.path().to_path_buf();
    let dense = KeptIndices::dense(&base.config);

    // First run: a new directory, round 1 trained and saved before its update goes out.
    let (mut keeper, resume) = StateKeeper::open(&dir, &base, 3, false).unwrap();
    assert_eq!(resume.opened, Opened::New);
    let mut s = session(&base, resume);
    let outcome = train(&base, s.handle(Timestamp(1), config(&base, 1, &dense)));
    assert_ne!(outcome.kept, dense, "a 0.2 arm prunes the tiny model");
    let cmds = s.handle(Timestamp(2), AgentEvent::JobDone(Ok(outcome.clone())));
    let update = sent_update(&cmds).expect("the update is sent").clone();
    assert!(keeper.round_done(&s, RoundId(1)).unwrap());
    let on_disk = std::fs::read(state_file(&dir)).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state_file(&dir)).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    // Killed before the update reached the aggregator, which re-sends the configuration: the
    // restarted agent holds the pruned model and answers with the saved update.
    drop((keeper, s));
    let (mut keeper, resume) = StateKeeper::open(&dir, &base, 3, false).unwrap();
    assert_eq!(
        resume.opened,
        Opened::Loaded {
            last_round: Some((RoundId(1), RoundStatus::Trained))
        }
    );
    assert_eq!(resume.state.kept, outcome.kept);
    assert_eq!(resume.state.adapter, Some(outcome.adapter.clone()));
    let mut s = session(&base, resume);
    let cmds = s.handle(Timestamp(3), config(&base, 1, &dense));
    assert_eq!(trains(&cmds), 0, "round 1 must not be trained twice");
    assert_eq!(sent_update(&cmds), Some(&update));
    assert!(keeper.uploaded(&s, RoundId(1)).unwrap());
    s.handle(
        Timestamp(4),
        AgentEvent::Message {
            msg: Message::Ack(Ack { round: RoundId(1) }),
            bytes: 20,
        },
    );
    assert!(keeper.answered(&s, RoundId(1), Ok(())).unwrap());
    assert!(
        !keeper.uploaded(&s, RoundId(1)).unwrap(),
        "acknowledged stays"
    );

    // Restarted after the acknowledgement: nothing left to re-send; round 2 trains from the
    // pruned state (its slice cut for the maps the aggregator recorded).
    drop((keeper, s));
    let (keeper, resume) = StateKeeper::open(&dir, &base, 3, false).unwrap();
    assert!(resume.unacked.is_none());
    let mut s = session(&base, resume);
    let cmds = s.handle(Timestamp(5), config(&base, 2, &outcome.kept));
    let job_state = cmds.iter().find_map(|c| match c {
        AgentCommand::Train { state, .. } => Some(state.kept.clone()),
        _ => None,
    });
    assert_eq!(job_state, Some(outcome.kept.clone()));

    // Killed mid-training in round 2: the file still holds round 1's end, so the restarted
    // agent trains round 2 again from exactly that state.
    drop((keeper, s));
    let (_keeper, resume) = StateKeeper::open(&dir, &base, 3, false).unwrap();
    assert_eq!(
        resume.opened,
        Opened::Loaded {
            last_round: Some((RoundId(1), RoundStatus::Acknowledged))
        }
    );
    assert_eq!(resume.state.kept, outcome.kept);
    let mut s = session(&base, resume);
    let cmds = s.handle(Timestamp(6), config(&base, 2, &outcome.kept));
    assert_eq!(trains(&cmds), 1);
    assert_ne!(std::fs::read(state_file(&dir)).unwrap(), on_disk);
}

/// A state directory holding one saved round of device 3 on the tiny model.
fn saved_dir(name: &str, base: &Llama) -> tempfile::TempDir {
    let tmp_dir = temp_dir(name);
    let dir = tmp_dir.path().to_path_buf();
    let (mut keeper, resume) = StateKeeper::open(&dir, base, 3, false).unwrap();
    let mut s = session(base, resume);
    let dense = KeptIndices::dense(&base.config);
    let outcome = train(base, s.handle(Timestamp(1), config(base, 1, &dense)));
    s.handle(Timestamp(2), AgentEvent::JobDone(Ok(outcome)));
    keeper.round_done(&s, RoundId(1)).unwrap();
    tmp_dir
}

/// Opens `dir` for device 3 and returns the error's text (the open must fail).
fn open_error(dir: &Path, base: &Llama) -> String {
    match StateKeeper::open(dir, base, 3, false) {
        Ok(_) => panic!("opening {} must fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unusable_state_files_are_errors_naming_the_file_and_never_a_dense_start() {
    let base = tiny_model(&Device::flex());
    let tmp_dir = saved_dir("bad", &base);
    let dir = tmp_dir.path().to_path_buf();
    let path = state_file(&dir);
    let name = path.display().to_string();
    let good = std::fs::read(&path).unwrap();
    let body_at = file::HEADER_BYTES;
    let check = |bytes: &[u8], expect: &str| {
        std::fs::write(&path, bytes).unwrap();
        let err = open_error(&dir, &base);
        assert!(err.contains(&name), "{err}");
        assert!(err.contains(expect), "{expect:?} in {err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "an unusable file stays as it was"
        );
    };
    let mut flipped = good.clone();
    flipped[body_at + 40] ^= 0x10;
    check(&flipped, "corrupt: checksum mismatch");
    let mut header_flip = good.clone();
    header_flip[30] ^= 1;
    check(&header_flip, "corrupt: checksum mismatch");
    check(&good[..good.len() - 7], "truncated");
    check(&good[..20], "truncated");
    let mut extended = good.clone();
    extended.push(0);
    check(&extended, "1 unexpected bytes");
    let mut version = good.clone();
    version[8] = 9;
    check(&version, "container format version 9");
    let mut schema = good.clone();
    schema[12] = 77;
    check(&schema, "state schema 77");
    check(b"{\"kept\": []}\n", "not a FedSpine device state file");
    check(b"", "truncated");

    // Another base model (same shape, other weights) and another device.
    std::fs::write(&path, &good).unwrap();
    let other = Llama::random(base.config.clone(), 8, &Device::flex());
    let err = match StateKeeper::open(&dir, &other, 3, false) {
        Ok(_) => panic!("another model must not load this state"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&name) && err.contains("belongs to another base model"),
        "{err}"
    );
    let err = match StateKeeper::open(&dir, &base, 4, false) {
        Ok(_) => panic!("another device must not load this state"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("belongs to device 3, not to device 4"),
        "{err}"
    );
    assert!(tuned_model(&dir, other.clone()).is_err());

    // Only an explicit fresh start replaces it, and the old file is kept.
    std::fs::write(&path, &flipped).unwrap();
    let (k, resume) = StateKeeper::open(&dir, &base, 3, true).unwrap();
    // One agent per directory: a second keeper is refused while this one lives.
    let busy = match StateKeeper::open(&dir, &base, 3, false) {
        Ok(_) => panic!("a second agent must not open a directory in use"),
        Err(e) => e.to_string(),
    };
    assert!(busy.contains("locked by another running agent"), "{busy}");
    drop(k);
    let old = path.with_extension("bin.old");
    assert_eq!(resume.opened, Opened::Replaced { old: old.clone() });
    assert_eq!(resume.state.kept, KeptIndices::dense(&base.config));
    assert_eq!(std::fs::read(&old).unwrap(), flipped);
    assert!(load(&dir, &base).unwrap().is_some());
    // A second fresh start keeps the first one's file too.
    let dense_file = std::fs::read(&path).unwrap();
    let (_k, resume) = StateKeeper::open(&dir, &base, 3, true).unwrap();
    let second = path.with_extension("bin.old.2");
    assert_eq!(
        resume.opened,
        Opened::Replaced {
            old: second.clone()
        }
    );
    assert_eq!(std::fs::read(&old).unwrap(), flipped);
    assert_eq!(std::fs::read(&second).unwrap(), dense_file);
}

/// What else an attacker, or an accident, can put at the state file's path or in its body:
/// a FIFO (opening it would block), a link to a device that never ends, a directory, a
/// directory every user can write into, and a well-formed, checksummed body whose string length
/// asks for 2^61 bytes. Each is an error naming the file, at once and without a huge
/// allocation.
#[cfg(unix)]
#[test]
fn special_files_open_directories_and_lying_lengths_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let base = tiny_model(&Device::flex());
    let tmp_dir = temp_dir("special");
    let dir = tmp_dir.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let path = state_file(&dir);
    let expect = |what: &str| {
        let err = open_error(&dir, &base);
        assert!(
            err.contains(&path.display().to_string()) && err.contains(what),
            "{err}"
        );
    };
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    expect("not a regular file but a FIFO");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    expect("not a regular file but a device");
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    expect("not a regular file but a directory");
    std::fs::remove_dir(&path).unwrap();

    // A body that encodes 2^61 as a string's length, read as a string.
    let fp = Fingerprint::of(&base);
    file::write_atomic(&path, SCHEMA_VERSION, &fp, &(1u64 << 61)).unwrap();
    let err = file::read::<String>(&path, SCHEMA_VERSION)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot decode the state"), "{err}");
    std::fs::remove_file(&path).unwrap();

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = open_error(&dir, &base);
    assert!(err.contains("writable by every user (mode 777)"), "{err}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(StateKeeper::open(&dir, &base, 3, false).is_ok());
}

#[test]
fn stale_temporary_files_are_removed_and_links_are_not_followed() {
    let base = tiny_model(&Device::flex());
    let tmp_dir = saved_dir("temps", &base);
    let dir = tmp_dir.path().to_path_buf();
    let target = dir.join("precious.txt");
    std::fs::write(&target, "keep me").unwrap();
    let stale = dir.join(".device-state.bin.tmp.1.0");
    std::fs::write(&stale, "half a state").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, dir.join(".device-state.bin.tmp.1.1")).unwrap();
    let (_k, resume) = StateKeeper::open(&dir, &base, 3, false).unwrap();
    assert!(matches!(resume.opened, Opened::Loaded { .. }));
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
}

#[test]
fn the_state_dir_model_is_the_pruned_base_with_the_trained_adapter() {
    let base = tiny_model(&Device::flex());
    let tmp_dir = saved_dir("model", &base);
    let dir = tmp_dir.path().to_path_buf();
    let (model, adapter, saved) = tuned_model(&dir, base.clone()).unwrap();
    let adapter = adapter.expect("a trained adapter");
    assert_eq!(saved.device_id, 3);
    assert!(model.config.sparsity() > 0.0);
    let (rank, alpha, host) = saved.device.adapter.clone().unwrap();
    assert_eq!((adapter.rank, adapter.alpha), (rank, alpha));
    assert_eq!(adapter.to_host(), host);
    let want = crate::prune::slice_model(&base, &saved.device.kept).unwrap();
    let toks = base.tokens_tensor(&[vec![1, 2, 3, 4, 5]]);
    assert_eq!(
        crate::model::to_rows(model.forward(toks.clone(), Some(&adapter))),
        crate::model::to_rows(want.forward(toks, Some(&adapter)))
    );
    let (fp, inspected) = inspect(&dir).unwrap();
    assert_eq!(fp, Fingerprint::of(&base));
    assert_eq!(inspected.device.kept, saved.device.kept);
    let missing = dir.join("no-such-dir");
    let err = inspect(&missing).unwrap_err().to_string();
    assert!(err.contains("no state file"), "{err}");
}

/// Largest difference between two logit tables.
fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |w, (x, y)| w.max((x - y).abs()))
}

fn argmax_rows(rows: &[Vec<f32>]) -> Vec<usize> {
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::MIN), |w, (i, &x)| if x > w.1 { (i, x) } else { w })
                .0
        })
        .collect()
}

/// The real SmolLM2-135M: a pruned round saved to a state directory; the state-dir model
/// (pruned base plus the adapter, unmerged) and its F32 GGUF and HF safetensors exports
/// (merged, written, reloaded) give the same logits. Tolerance: 1e-3 absolute on logits of
/// magnitude ~10-30, the f32 rounding of `x (W + s a b)` against `x W + s (x a) b`; the greedy
/// choice at every position must agree. (Measured: 1.7e-4 for both formats.)
#[test]
fn the_real_state_dir_model_and_its_exports_give_the_same_logits() {
    use crate::export::{self, GgufPrecision};
    let (base, tok) =
        crate::weights::load(&crate::assets::default_model().unwrap(), &Device::flex()).unwrap();
    let tmp_dir = temp_dir("export");
    let dir = tmp_dir.path().to_path_buf();
    let (mut keeper, resume) = StateKeeper::open(&dir, &base, 3, false).unwrap();
    let mut s = session(&base, resume);
    let dense = KeptIndices::dense(&base.config);
    let ids = tok
        .encode("The Congress shall have power to lay and collect taxes")
        .unwrap();
    let data = LocalData::Lm(LmShard {
        seq_len: 8,
        train: ids.windows(9).step_by(2).map(<[u32]>::to_vec).collect(),
        test: vec![ids[..9].to_vec()],
    });
    let cmds = s.handle(Timestamp(1), config(&base, 1, &dense));
    let (job, state) = cmds
        .into_iter()
        .find_map(|c| match c {
            AgentCommand::Train { mut job, state } => {
                job.local_steps = 2;
                job.prune_every = 1;
                Some((job, state))
            }
            _ => None,
        })
        .unwrap();
    let held = HeldModel::sliced(&base, &state.kept).unwrap();
    let outcome = run_job(&job, &state, held, &data, &agent(&base), |_| true)
        .outcome
        .unwrap();
    s.handle(Timestamp(2), AgentEvent::JobDone(Ok(outcome)));
    keeper.round_done(&s, RoundId(1)).unwrap();

    let (model, adapter, _) = tuned_model(&dir, base.clone()).unwrap();
    let adapter = adapter.unwrap();
    assert!(model.config.sparsity() > 0.0);
    let toks = base.tokens_tensor(std::slice::from_ref(&ids));
    let want = crate::model::to_rows(model.forward(toks.clone(), Some(&adapter)));
    let merged = adapter.merge_into(&model);

    let gguf = dir.join("device.gguf");
    export::export_gguf(&merged, &tok, &gguf, GgufPrecision::F32).unwrap();
    let (g, _) = crate::weights::load(&gguf, &Device::flex()).unwrap();
    let got = crate::model::to_rows(g.forward(toks.clone(), None));
    let d = max_diff(&got, &want);
    eprintln!("GGUF F32 export: max abs logit difference {d}");
    assert!(d < 1e-3, "GGUF reload differs by {d}");
    assert_eq!(argmax_rows(&got), argmax_rows(&want));

    let hf = dir.join("hf");
    export::export_hf(&merged, &tok, &hf).unwrap();
    let (h, _) = crate::weights::load(&hf, &Device::flex()).unwrap();
    let got = crate::model::to_rows(h.forward(toks, None));
    let d = max_diff(&got, &want);
    eprintln!("safetensors export: max abs logit difference {d}");
    assert!(d < 1e-3, "safetensors reload differs by {d}");
    assert_eq!(argmax_rows(&got), argmax_rows(&want));
}

/// `join` holds only the device's own model between rounds (its base pruned in place, never a
/// dense copy beside it): rounds on the model each round hands back give the very outcome
/// (update, losses, kept maps, report) of rounds on fresh slices of the dense base; a round
/// cancelled after it pruned hands back a model narrower than the state's maps, which
/// `covers` tells the driver, and slicing it back to them is refused.
#[test]
fn rounds_on_the_held_model_equal_rounds_on_fresh_slices_of_the_base() {
    let base = tiny_model(&Device::flex());
    let data = LocalData::Lm(rule_shard());
    let job = |round: u64| crate::session::TrainJob {
        round: RoundId(round),
        arm: Arm::new(0.15 * round as f64, 4),
        target_sparsity: None,
        global: None,
        local_steps: 6,
        prune_every: 2,
        lr: 0.01,
        batch: 2,
        seed: 40 + round,
        alpha: 16.0,
        deadline: Timestamp(u64::MAX),
        rank_pruning: None,
        memory: crate::cost::MemoryMode::KeepActivations,
    };
    let mut state = DeviceState::fresh(&base);
    let mut held = HeldModel::dense(base.clone()).unwrap();
    for round in 1..=2 {
        let fresh = HeldModel::sliced(&base, &state.kept).unwrap();
        let want = run_job(&job(round), &state, fresh, &data, &agent(&base), |_| true)
            .outcome
            .unwrap();
        let before = held.model().config.sparsity();
        let run = run_job(&job(round), &state, held, &data, &agent(&base), |_| true);
        let got = run.outcome.unwrap();
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "round {round}");
        assert!(
            got.stats.sparsity as f64 > before + 0.05,
            "round {round} pruned"
        );
        assert_eq!(run.held.kept(), &got.kept);
        held = run.held;
        state = DeviceState {
            kept: got.kept,
            adapter: Some(got.adapter),
            importance: got.importance,
        };
    }
    // Cancelled after the pruning event at step 2: the model lies beyond the state's maps.
    let mut steps = 0;
    let run = run_job(&job(3), &state, held, &data, &agent(&base), |_| {
        steps += 1;
        steps < 3
    });
    assert!(run.outcome.is_err());
    assert!(!run.held.covers(&state.kept));
    let err = run_job(&job(4), &state, run.held, &data, &agent(&base), |_| true)
        .outcome
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("is not among the units the model still holds"),
        "{err}"
    );
}

/// Well-formed, checksummed states that do not hold together (as a bug or an attacker with the
/// public base weights could write them): an unacknowledged update reporting maps the device
/// does not hold, an importance history of another shape, a model config no model has. Each
/// is refused by name, not resent, used or printed.
#[test]
fn checksummed_states_that_do_not_hold_together_are_refused() {
    let base = tiny_model(&Device::flex());
    let tmp_dir = saved_dir("inconsistent", &base);
    let dir = tmp_dir.path().to_path_buf();
    let path = state_file(&dir);
    let fp = Fingerprint::of(&base);
    let (_, good): (Fingerprint, SavedState) = file::read(&path, SCHEMA_VERSION).unwrap();
    assert!(good.last_round.as_ref().unwrap().unacked.is_some());
    let write = |s: &SavedState| file::write_atomic(&path, SCHEMA_VERSION, &fp, s).unwrap();

    let mut other_maps = good.clone();
    let unacked = other_maps
        .last_round
        .as_mut()
        .unwrap()
        .unacked
        .as_mut()
        .unwrap();
    unacked.update.kept = KeptIndices::dense(&base.config);
    assert_ne!(unacked.update.kept, good.device.kept);
    write(&other_maps);
    let err = open_error(&dir, &base);
    assert!(err.contains("kept maps differ from the device's"), "{err}");

    let mut other_history = good.clone();
    other_history.device.importance.ema.pop();
    write(&other_history);
    let err = open_error(&dir, &base);
    assert!(err.contains("importance history"), "{err}");

    let mut odd_model = good.clone();
    odd_model.model.head_dim = 15;
    write(&odd_model);
    let err = open_error(&dir, &base);
    assert!(err.contains("model config: the head width is 15"), "{err}");
    let err = inspect(&dir).unwrap_err().to_string();
    assert!(err.contains("model config: the head width is 15"), "{err}");

    write(&good);
    assert!(StateKeeper::open(&dir, &base, 3, false).is_ok());
}
