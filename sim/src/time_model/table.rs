//! The calibration's printed tables: measured against leave-one-out predictions of the
//! per-operator model and of the FLOPs-linear one, per point and in summary, and the fitted
//! coefficients.

use std::fmt::Write;

use super::{Calibration, StepKind, TimeModel, FEATURE_NAMES};

/// Markdown for a calibration and its fit.
pub fn markdown(cal: &Calibration, model: &TimeModel) -> String {
    let h = &cal.host;
    let mut s = String::new();
    // The CPU class where the file records it (since 2026-12-05), else the older fields.
    let cpu = h.class.as_ref().map_or_else(
        || format!("{} ({}), {} threads", h.cpu, h.isa.join(", "), h.threads),
        |c| c.line(),
    );
    let in_place = h.in_place_below_rows.map_or_else(
        || "every product packs the weights".to_string(),
        |rows| format!("products under {rows} rows read the weights in place"),
    );
    let _ = writeln!(
        s,
        "Host: {cpu}, {} build, {}; {in_place}; `{}`\n",
        h.build, h.date, h.command
    );
    let mut summary = Vec::new();
    for kind in StepKind::ALL {
        let pts = cal.of_kind(kind);
        if pts.len() < super::MIN_POINTS && !(kind == StepKind::TrainScoring && pts.len() > 1) {
            continue;
        }
        let v = cal.validation(kind);
        let _ = writeln!(
            s,
            "**{}** (each prediction from a fit that left the point out)\n",
            kind.name()
        );
        let _ = writeln!(
            s,
            "| shape | sparsity | rank | batch x seq | measured ms | per-operator ms | error | FLOPs-linear ms | error |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for (m, (t, ours, lin)) in pts.iter().zip(&v.predictions) {
            let w = &m.workload;
            let _ = writeln!(
                s,
                "| {} | {:.2} | {} | {} x {} | {t:.0} | {ours:.0} | {:+.1}% | {lin:.0} | {:+.1}% |",
                m.label,
                m.sparsity,
                w.rank,
                w.batch,
                w.seq,
                (ours / t - 1.0) * 100.0,
                (lin / t - 1.0) * 100.0
            );
        }
        s.push('\n');
        summary.push((kind, v.points, v.ours(), v.flops_linear()));
    }
    let _ = writeln!(
        s,
        "| kind | points | per-operator max / mean error | FLOPs-linear max / mean error |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for (kind, n, ours, lin) in &summary {
        let _ = writeln!(
            s,
            "| {} | {n} | {:.1}% / {:.1}% | {:.1}% / {:.1}% |",
            kind.name(),
            ours.0 * 100.0,
            ours.1 * 100.0,
            lin.0 * 100.0,
            lin.1 * 100.0
        );
    }
    let _ = writeln!(s, "\nCoefficients (ms per unit; fit to all points):\n");
    let _ = writeln!(
        s,
        "| term | {} |",
        model
            .coefficients
            .iter()
            .map(|(k, _)| k.name())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---|".repeat(model.coefficients.len()));
    for (i, name) in FEATURE_NAMES.iter().enumerate() {
        let row: Vec<String> = model
            .coefficients
            .iter()
            .map(|(_, c)| format!("{:.4}", c[i]))
            .collect();
        let _ = writeln!(s, "| {name} | {} |", row.join(" | "));
    }
    let _ = writeln!(
        s,
        "\nA step that accumulates importance costs {:.3} plain steps (mean over the scoring points).",
        model.scoring_factor
    );
    let _ = writeln!(
        s,
        "\nReference step (dense, rank {}, {} x {}): {:.0} ms, {:.1} GFLOP/s on this host.",
        super::REFERENCE.0,
        super::REFERENCE.1,
        super::REFERENCE.2,
        model.reference_ms,
        model.reference_gflops()
    );
    s
}
