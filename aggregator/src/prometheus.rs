//! The aggregator's Prometheus metrics: the text exposition format (version 0.0.4) rendered
//! from the coordinator's run counters and its closed rounds, and the tiny HTTP/1.1 exchange
//! that serves it (`GET /metrics`). Pure: the server owns the socket and calls [`respond`].
//!
//! Exposed: rounds started, aggregated and abandoned; devices connected; joins, heartbeats,
//! accepted updates, round failures, out-of-memory reports, missed devices; rejects by reason;
//! bytes received and sent; the duration of closed rounds (a histogram); arms played by rank
//! and pruning-ratio bucket; the last round's number, participants and mean losses.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::coordinator::{Counters, RoundSummary};

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
        self.last_round = Some(round.clone());
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
