//! One device connection: the handshake within its time budget (TLS with a client certificate
//! from the private CA, certificate -> device id, the revocation list, the duplicate policy),
//! then a reader (frames -> coordinator events, each frame whole within its deadline, the
//! message rate limited) and a writer (queue -> stream, each write within its timeout; a close
//! request flushes the queue, finishes the stream, waits for the peer to read it, then closes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{CodecError, Message, Reject, RejectReason};
use quinn::VarInt;
use tokio::sync::{mpsc as tmpsc, Notify};
use transport::TransportError;

use super::registry::{close_code, Conn, Counters, Input, Outbound, Shared, Slot};
use crate::coordinator::Event;

/// After a close request the writer waits this long for the peer to read what was sent.
pub(super) const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// Serves one incoming connection until it ends.
pub(super) async fn handle(incoming: quinn::Incoming, shared: Arc<Shared>, mut slot: Slot) {
    let remote = incoming.remote_address();
    let limits = &shared.limits;
    let accepted = tokio::time::timeout(
        limits.handshake_timeout,
        transport::accept_device_checked(incoming, shared.max_frame_bytes, &shared.revocations),
    )
    .await;
    slot.handshake_done();
    let conn = match accepted {
        Ok(Ok(conn)) => conn,
        Ok(Err(TransportError::Revoked(revoked))) => {
            Counters::bump(&shared.counters.revoked_refusals);
            return tracing::warn!(%remote, reason = %revoked, "connection refused: revoked");
        }
        Ok(Err(e)) => {
            Counters::bump(&shared.counters.handshake_failures);
            return tracing::warn!(%remote, error = %e, "connection refused");
        }
        Err(_) => {
            // Dropping the handshake future closes the connection.
            Counters::bump(&shared.counters.handshake_timeouts);
            return tracing::warn!(%remote, budget_ms = limits.handshake_timeout.as_millis() as u64, "handshake not finished in time");
        }
    };
    let device = conn.device;
    let connection = conn.connection;
    let (send, mut recv) = conn.stream.into_parts();
    let (conn, rx) = match shared.register(device, connection.clone(), conn.fingerprint) {
        Ok(registered) => registered,
        Err(reason) => {
            tracing::warn!(%device, %remote, %reason, "duplicate connection refused");
            connection.close(VarInt::from_u32(close_code::DUPLICATE), reason.as_bytes());
            return;
        }
    };
    tracing::info!(%device, %remote, "device connected");
    shared.input(Input::Event(Event::Connected { device }, None));

    let writer = tokio::spawn(write_loop(
        send,
        rx,
        connection.clone(),
        conn.drained.clone(),
        shared.clone(),
    ));
    read_loop(&mut recv, &conn, &shared).await;
    if shared.unregister(&conn) {
        tracing::info!(%device, "device disconnected");
        shared.input(Input::Event(Event::Disconnected { device }, None));
    }
    // The writer ends once the queue's last sender (this connection's entry) is gone.
    drop(conn);
    let _ = tokio::time::timeout(CLOSE_FLUSH + Duration::from_millis(500), writer).await;
    connection.close(VarInt::from_u32(close_code::NORMAL), b"");
}

/// Frames -> coordinator events until the stream or connection ends, a frame is refused, or
/// the peer floods.
async fn read_loop(recv: &mut quinn::RecvStream, conn: &Arc<Conn>, shared: &Arc<Shared>) {
    let limits = &shared.limits;
    let device = conn.device;
    let mut bucket = TokenBucket::new(limits.messages_per_second, limits.message_burst);
    let mut over_rate = 0u32;
    loop {
        let read =
            transport::recv_frame_within(recv, shared.max_frame_bytes, limits.frame_read_timeout)
                .await;
        match read {
            Ok(Some((msg, bytes))) => {
                conn.touch(shared);
                if !bucket.take(Instant::now()) {
                    Counters::bump(&shared.counters.rate_limited_messages);
                    over_rate += 1;
                    if over_rate > limits.message_burst {
                        Counters::bump(&shared.counters.flood_disconnects);
                        let reason = format!(
                            "message flood: more than {} messages per second",
                            limits.messages_per_second
                        );
                        tracing::warn!(%device, %reason, "closing a flooding device");
                        conn.close_now(close_code::FLOOD, &reason);
                        return;
                    }
                    tracing::debug!(%device, kind = msg.kind(), "message over the rate limit dropped");
                    continue;
                }
                let Some(permit) = shared.inbound_permit(conn, bytes).await else {
                    return;
                };
                let event = Event::Message {
                    device,
                    msg,
                    bytes: bytes as u64,
                };
                shared.input(Input::Event(event, Some(permit)));
            }
            Ok(None) => return,
            Err(TransportError::FrameTimeout { limit_ms }) => {
                Counters::bump(&shared.counters.frame_timeouts);
                let reason = format!("a frame did not arrive whole within {limit_ms} ms");
                tracing::warn!(%device, %reason, "closing a slow sender");
                conn.close_now(close_code::FRAME_TIMEOUT, &reason);
                return;
            }
            Err(TransportError::Codec(e)) => {
                let reason = codec_reject(&e);
                tracing::warn!(%device, error = %e, "frame refused");
                Counters::bump(&shared.counters.frames_refused);
                shared.input(Input::Refused(device, reason.clone()));
                let text = reason.to_string();
                shared.send_on(
                    conn,
                    &Message::Reject(Reject {
                        round: None,
                        reason,
                    }),
                );
                shared.close_after_queue(conn, text);
                return;
            }
            Err(e) => {
                return tracing::debug!(%device, error = %e, "connection ended");
            }
        }
    }
}

/// Queue -> stream; each write must finish within the write timeout. Tells the reader
/// (`drained`) whenever the queue shrank, and when it stops.
async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: tmpsc::Receiver<Outbound>,
    connection: quinn::Connection,
    drained: Arc<Notify>,
    shared: Arc<Shared>,
) {
    write_frames(&mut send, &mut rx, &connection, &drained, &shared).await;
    rx.close();
    drained.notify_waiters();
}

async fn write_frames(
    send: &mut quinn::SendStream,
    rx: &mut tmpsc::Receiver<Outbound>,
    connection: &quinn::Connection,
    drained: &Notify,
    shared: &Shared,
) {
    let write_timeout = shared.limits.write_timeout;
    while let Some(out) = rx.recv().await {
        drained.notify_waiters();
        match out {
            Outbound::Frame(frame) => {
                let write = transport::send_frame_bytes(send, &frame.bytes);
                match tokio::time::timeout(write_timeout, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(remote = %connection.remote_address(), error = %e, "send failed");
                        break;
                    }
                    Err(_) => {
                        Counters::bump(&shared.counters.slow_readers);
                        let reason = format!(
                            "a write did not finish within {} ms: the device does not read",
                            write_timeout.as_millis()
                        );
                        tracing::warn!(remote = %connection.remote_address(), %reason, "closing a device that does not read");
                        connection
                            .close(VarInt::from_u32(close_code::SLOW_READER), reason.as_bytes());
                        break;
                    }
                }
            }
            Outbound::Close(reason) => {
                let _ = send.finish();
                let _ = tokio::time::timeout(CLOSE_FLUSH, send.stopped()).await;
                connection.close(VarInt::from_u32(close_code::NORMAL), reason.as_bytes());
                break;
            }
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: if rate.is_finite() { rate.max(0.0) } else { 0.0 },
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes a token if one is there.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The reject a device gets for a frame the codec refused.
fn codec_reject(e: &CodecError) -> RejectReason {
    match e {
        CodecError::FrameTooLarge { len, max } => RejectReason::TooLarge {
            bytes: *len,
            limit: *max,
        },
        CodecError::VersionMismatch { ours, theirs } => RejectReason::VersionMismatch {
            ours: *ours,
            theirs: *theirs,
        },
        other => RejectReason::Malformed(other.to_string()),
    }
}
