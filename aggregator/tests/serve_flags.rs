//! `aggregator serve`'s limit flags: a budget of 0 is refused by name before any file is read,
//! and accepted values get as far as the configuration file.

use std::process::Command;

fn serve(extra: &[&str]) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("fedspine-serve-flags-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("missing.toml"))
        .arg("--pki")
        .arg(&dir)
        .arg("--state")
        .arg(&dir)
        .args(extra)
        .output()
        .expect("run the aggregator binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn zero_budgets_are_refused_by_name() {
    for flag in [
        "--inbound-messages",
        "--inbound-mib",
        "--outbound-queue-mib",
    ] {
        let (ok, err) = serve(&[flag, "0"]);
        assert!(!ok);
        assert!(err.contains(&format!("{flag} must be at least 1")), "{err}");
    }
    let (ok, err) = serve(&["--messages-per-second", "0"]);
    assert!(!ok && err.contains("--messages-per-second"), "{err}");
    let huge = (usize::MAX / 2).to_string();
    let (ok, err) = serve(&["--inbound-mib", &huge]);
    assert!(!ok && err.contains("--inbound-mib"), "{err}");
}

#[test]
fn accepted_budgets_reach_the_configuration_file() {
    let (ok, err) = serve(&[
        "--inbound-messages",
        "64",
        "--inbound-mib",
        "256",
        "--outbound-queue-mib",
        "16",
    ]);
    assert!(!ok);
    assert!(err.contains("missing.toml"), "{err}");
    assert!(!err.contains("must be"), "{err}");
}
