//! The aggregator's Prometheus metrics: the text exposition format (version 0.0.4) rendered
//! from the coordinator's run counters and its closed rounds, and the tiny HTTP/1.1 exchange
//! that serves it (`GET /metrics`). Pure: the server owns the socket and calls [`respond`].
//!
//! Exposed: rounds started, aggregated and abandoned; devices connected; joins, heartbeats,
//! accepted updates, round failures, out-of-memory reports, missed devices; rejects by reason;
//! bytes received and sent; the duration of closed rounds (a histogram); arms played by rank
//! and pruning-ratio bucket; per device class, the arms assigned and the share of the class's
//! devices on each arm now; the last round's number, participants and mean losses.
//!
//! Label cardinality is bounded: ranks come from the run's arm space, ratios fall in ten
//! buckets, and device classes (checked words of at most 32 characters, see
//! `protocol::check_device_class`) get their own label for the first [`MAX_CLASS_LABELS`]
//! seen; devices of any later class are counted under `other`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use protocol::DeviceId;

use crate::coordinator::{Counters, RoundSummary};

/// Distinct device-class labels the metrics keep; later classes are counted as
/// [`OTHER_CLASS`].
pub const MAX_CLASS_LABELS: usize = 32;
/// The label of the classes past [`MAX_CLASS_LABELS`].
pub const OTHER_CLASS: &str = "other";

/// An arm as the metrics label it: device-class label, LoRA rank, pruning-ratio bucket.
pub type ClassArm = (String, u32, String);

/// Upper bounds (seconds) of the round-duration histogram's buckets.
pub const ROUND_SECONDS_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// What the metrics are computed from.
#[derive(Debug, Default, Clone)]
pub struct MetricsView {
    pub counters: Counters,
    /// Devices with a live, authenticated connection now.
    pub connected: usize,
    /// Bytes of round configurations sent, over the run.
    pub bytes_sent: u64,
    /// Closed-round durations in seconds, over the run (the histogram's observations).
    pub round_seconds: Vec<f64>,
    /// Arms played (accepted updates) by `(rank, ratio bucket)`, over the run.
    pub arms: BTreeMap<(u32, String), u64>,
    /// Arms assigned to selected devices by class label, rank and ratio bucket, over the run.
    pub class_arms: BTreeMap<ClassArm, u64>,
    /// Each device's latest assigned arm (bounded by the devices the coordinator knows).
    pub current_arms: BTreeMap<DeviceId, ClassArm>,
    /// The class labels in use, at most [`MAX_CLASS_LABELS`] (besides [`OTHER_CLASS`]).
    pub class_labels: BTreeSet<String>,
    /// The last closed round, if any.
    pub last_round: Option<RoundSummary>,
}

impl MetricsView {
    /// Fold a closed round into the run-wide series.
    pub fn observe_round(&mut self, round: &RoundSummary) {
        self.round_seconds.push(round.duration_ms() as f64 / 1000.0);
        self.bytes_sent = self.bytes_sent.saturating_add(round.bytes_down);
        for p in &round.participants {
            *self
                .arms
                .entry((p.arm.rank, ratio_bucket(p.arm.prune_ratio)))
                .or_insert(0) += 1;
        }
        for a in &round.assigned {
            let arm = (
                self.class_label(&a.device_class),
                a.arm.rank,
                ratio_bucket(a.arm.prune_ratio),
            );
            *self.class_arms.entry(arm.clone()).or_insert(0) += 1;
            self.current_arms.insert(a.device, arm);
        }
        self.last_round = Some(round.clone());
    }

    /// The label `class` is counted under: itself while fewer than [`MAX_CLASS_LABELS`]
    /// classes have been seen (or it is one of them), else [`OTHER_CLASS`].
    pub fn class_label(&mut self, class: &str) -> String {
        if class != OTHER_CLASS
            && (self.class_labels.contains(class) || self.class_labels.len() < MAX_CLASS_LABELS)
        {
            self.class_labels.insert(class.to_string());
            class.to_string()
        } else {
            OTHER_CLASS.to_string()
        }
    }

    /// Per class label, the share of its devices whose latest assigned arm is each arm.
    pub fn class_arm_shares(&self) -> BTreeMap<ClassArm, f64> {
        let mut devices: BTreeMap<&str, u64> = BTreeMap::new();
        let mut on_arm: BTreeMap<&ClassArm, u64> = BTreeMap::new();
        for arm in self.current_arms.values() {
            *devices.entry(arm.0.as_str()).or_insert(0) += 1;
            *on_arm.entry(arm).or_insert(0) += 1;
        }
        on_arm
            .into_iter()
            .map(|(arm, n)| (arm.clone(), n as f64 / devices[arm.0.as_str()] as f64))
            .collect()
    }
}

/// The pruning-ratio bucket an arm is counted in: tenths, as `0.0-0.1`, ..., `0.9-1.0`.
pub fn ratio_bucket(ratio: f64) -> String {
    let r = if ratio.is_finite() {
        ratio.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let lo = ((r * 10.0).floor() as u32).min(9);
    format!(
        "0.{lo}-{}",
        if lo == 9 {
            "1.0".into()
        } else {
            format!("0.{}", lo + 1)
        }
    )
}

/// Escape a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.0, " {}", float(value));
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value as f64);
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }
}

/// The exposition text for `view`.
pub fn render(view: &MetricsView) -> String {
    let c = &view.counters;
    let mut o = Out(String::new());
    o.counter(
        "fedspine_rounds_started_total",
        "Rounds started.",
        c.rounds_started,
    );
    o.counter(
        "fedspine_rounds_aggregated_total",
        "Rounds that met their quorum and were aggregated.",
        c.rounds_aggregated,
    );
    o.counter(
        "fedspine_rounds_abandoned_total",
        "Rounds closed without quorum.",
        c.rounds_abandoned,
    );
    o.gauge(
        "fedspine_devices_connected",
        "Devices with a live authenticated connection.",
        view.connected as f64,
    );
    o.counter(
        "fedspine_connections_total",
        "Connections accepted.",
        c.connections,
    );
    o.counter("fedspine_joins_total", "Join messages handled.", c.joins);
    o.counter(
        "fedspine_heartbeats_total",
        "Heartbeats received.",
        c.heartbeats,
    );
    o.counter(
        "fedspine_updates_accepted_total",
        "Device updates accepted into a round.",
        c.updates_accepted,
    );
    o.counter(
        "fedspine_round_failures_total",
        "Rounds a selected device reported as failed.",
        c.round_failures,
    );
    o.counter(
        "fedspine_out_of_memory_total",
        "Rounds a device refused for lack of memory.",
        c.out_of_memory,
    );
    o.counter(
        "fedspine_missed_total",
        "Selected devices that had not answered when their round closed.",
        c.missed,
    );
    o.counter(
        "fedspine_non_finite_aggregates_total",
        "Round aggregates with non-finite values (the previous global was kept).",
        c.non_finite_aggregates,
    );
    o.counter(
        "fedspine_updates_screened_out_total",
        "Accepted updates left out of their round's aggregate by norm screening.",
        c.updates_screened_out,
    );
    o.counter(
        "fedspine_samples_clipped_total",
        "Accepted updates whose reported sample count was clipped to the bound.",
        c.samples_clipped,
    );
    o.family(
        "fedspine_rejects_total",
        "counter",
        "Rejects sent to devices, by reason.",
    );
    for (kind, n) in &c.rejects {
        o.sample("fedspine_rejects_total", &[("reason", kind)], *n as f64);
    }
    o.family(
        "fedspine_bytes_total",
        "counter",
        "Frame bytes by direction.",
    );
    o.sample(
        "fedspine_bytes_total",
        &[("direction", "received")],
        c.bytes_received as f64,
    );
    o.sample(
        "fedspine_bytes_total",
        &[("direction", "sent")],
        view.bytes_sent as f64,
    );
    let name = "fedspine_round_duration_seconds";
    o.family(name, "histogram", "Wall time of closed rounds.");
    let bucket = format!("{name}_bucket");
    for le in ROUND_SECONDS_BUCKETS {
        let n = view.round_seconds.iter().filter(|&&s| s <= le).count();
        o.sample(&bucket, &[("le", &float(le))], n as f64);
    }
    o.sample(&bucket, &[("le", "+Inf")], view.round_seconds.len() as f64);
    o.sample(&format!("{name}_sum"), &[], view.round_seconds.iter().sum());
    o.sample(
        &format!("{name}_count"),
        &[],
        view.round_seconds.len() as f64,
    );
    o.family(
        "fedspine_arm_plays_total",
        "counter",
        "Accepted updates by the arm played: LoRA rank and pruning-ratio bucket.",
    );
    for ((rank, ratio), n) in &view.arms {
        o.sample(
            "fedspine_arm_plays_total",
            &[("rank", &rank.to_string()), ("ratio", ratio)],
            *n as f64,
        );
    }
    o.family(
        "fedspine_arm_assignments_total",
        "counter",
        "Arms sent to selected devices, by device class, LoRA rank and pruning-ratio bucket.",
    );
    for ((class, rank, ratio), n) in &view.class_arms {
        o.sample(
            "fedspine_arm_assignments_total",
            &[
                ("class", class),
                ("rank", &rank.to_string()),
                ("ratio", ratio),
            ],
            *n as f64,
        );
    }
    o.family(
        "fedspine_class_arm_share_ratio",
        "gauge",
        "Share of a device class's devices whose latest assigned arm is this rank and ratio bucket.",
    );
    for ((class, rank, ratio), share) in view.class_arm_shares() {
        o.sample(
            "fedspine_class_arm_share_ratio",
            &[
                ("class", &class),
                ("rank", &rank.to_string()),
                ("ratio", &ratio),
            ],
            share,
        );
    }
    if let Some(r) = &view.last_round {
        o.gauge(
            "fedspine_last_round",
            "Number of the last closed round.",
            r.round.0 as f64,
        );
        o.gauge(
            "fedspine_last_round_participants",
            "Accepted updates in the last closed round.",
            r.participants.len() as f64,
        );
        if let (Some(pre), Some(post)) = (r.mean_loss_pre, r.mean_loss_post) {
            o.family(
                "fedspine_last_round_mean_loss",
                "gauge",
                "Sample-weighted mean held-out loss of the last round's participants.",
            );
            o.sample("fedspine_last_round_mean_loss", &[("when", "before")], pre);
            o.sample("fedspine_last_round_mean_loss", &[("when", "after")], post);
        }
    }
    o.0
}

/// Longest request head read before answering.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// The HTTP response to a request head (`head` is what arrived, up to [`MAX_REQUEST_BYTES`]):
/// `Some(bytes)` once the head is complete (or too long, or malformed), `None` while more may
/// come. Only `GET /metrics` (with or without a query) gets the exposition; anything else gets
/// 404, 405 or 400, and every response closes the connection.
pub fn respond(head: &[u8], metrics: impl FnOnce() -> String) -> Option<Vec<u8>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n");
    if end.is_none() && head.len() < MAX_REQUEST_BYTES {
        return None;
    }
    let reply = |status: &str, ctype: &str, body: String| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let text = "text/plain; charset=utf-8";
    let Some(end) = end else {
        return Some(reply(
            "431 Request Header Fields Too Large",
            text,
            "request head too long\n".into(),
        ));
    };
    let line = std::str::from_utf8(&head[..end])
        .ok()
        .and_then(|h| h.lines().next())
        .unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    match (method, target, version, parts.next()) {
        (Some(m), Some(t), Some(v), None) if v.starts_with("HTTP/1.") => {
            let path = t.split('?').next().unwrap_or("");
            if path != "/metrics" {
                Some(reply(
                    "404 Not Found",
                    text,
                    "only /metrics is served\n".into(),
                ))
            } else if m != "GET" && m != "HEAD" {
                Some(reply("405 Method Not Allowed", text, "use GET\n".into()))
            } else {
                let body = metrics();
                let mut r = reply("200 OK", "text/plain; version=0.0.4; charset=utf-8", body);
                if m == "HEAD" {
                    let cut = r
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map_or(r.len(), |p| p + 4);
                    r.truncate(cut);
                }
                Some(r)
            }
        }
        _ => Some(reply(
            "400 Bad Request",
            text,
            "malformed request line\n".into(),
        )),
    }
}

#[cfg(test)]
mod tests;
