//! Admission of a connection attempt, before any handshake state exists: address validation
//! (QUIC Retry), then the server's connection cap, then the per-address caps on connections and
//! handshakes. Validation comes first so the per-address caps count proven addresses only (a
//! spoofed source cannot use up another address's slots).

use std::sync::Arc;

use super::registry::{Counters, Shared, Slot, SlotRefused};

/// What became of a connection attempt.
pub(super) enum Admission {
    /// Go ahead with the handshake, holding this slot.
    Accept(Box<quinn::Incoming>, Slot),
    /// Answered (Retry sent, or refused by an address cap); nothing more to do.
    Answered,
    /// Refused because the server is full; the accept loop backs off.
    Full,
}

pub(super) fn admit(incoming: quinn::Incoming, shared: &Arc<Shared>) -> Admission {
    let remote = incoming.remote_address();
    if shared.limits.validate_addresses && !incoming.remote_address_validated() {
        if incoming.may_retry() {
            return match incoming.retry() {
                Ok(()) => {
                    Counters::bump(&shared.counters.retries_sent);
                    Admission::Answered
                }
                Err(e) => {
                    e.into_incoming().refuse();
                    Admission::Answered
                }
            };
        }
        // quinn says an unvalidated attempt may always be retried; refuse if it ever cannot.
        incoming.refuse();
        return Admission::Answered;
    }
    match shared.take_slot(remote.ip()) {
        Ok(slot) => Admission::Accept(Box::new(incoming), slot),
        Err(SlotRefused::Capacity) => {
            Counters::bump(&shared.counters.capacity_refusals);
            tracing::warn!(%remote, cap = shared.limits.max_connections, "connection cap reached; refusing");
            incoming.refuse();
            Admission::Full
        }
        Err(SlotRefused::Address {
            connections,
            handshakes,
        }) => {
            Counters::bump(&shared.counters.address_refusals);
            tracing::warn!(%remote, connections, handshakes, "per-address cap reached; refusing");
            incoming.refuse();
            Admission::Answered
        }
    }
}
