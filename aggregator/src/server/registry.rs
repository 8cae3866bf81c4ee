//! What the server's tasks share: the live connections by device (with the duplicate-connection
//! policy), connection slots per address ([`address_group`]: an IPv4 address, or an IPv6 /64,
//! which one host or user usually holds whole), the bounded outbound queue of each connection and
//! the bounded inbound path to the coordinator thread, and the counters of everything refused.
//!
//! # Bounds
//! - Outbound: each connection has a queue of at most `outbound_queue_frames` frames; a frame
//!   is refused once `outbound_queue_bytes` are queued, so the queue holds at most that plus one
//!   frame (a round configuration larger than the budget still goes to a device that reads). Frames are
//!   encoded on the coordinator thread, so the bytes are exact. A frame that does not fit
//!   means the device does not read: its connection is closed with the reason ("slow reader"),
//!   never buffered further. The server-wide total and its peak are metered.
//! - Inbound: a reader hands a message to the coordinator thread only with three permits, one
//!   of its connection's `inbound_per_connection`, one of the server's `inbound_total` and as
//!   many of the server's `inbound_bytes_total` as the frame has bytes (all of them for a frame
//!   larger than that), each a fair, first-come semaphore, released when the coordinator has
//!   handled it. So at most `inbound_total` messages of at most `inbound_bytes_total` bytes
//!   together wait, one connection holds at most `inbound_per_connection` of them and cannot
//!   starve the others, and a reader without its permits stops reading (QUIC flow control then
//!   holds its peer back). Connection events (up, down, a refused frame) need no
//!   permit: there are at most three per connection. So the channel to the coordinator thread
//!   holds at most `inbound_total` messages plus three events per live connection (at most
//!   `max_connections`), and the frames waiting in readers at most one per connection.
//! - Inbound waits for outbound: a reader hands over its next message only while its
//!   connection's outbound queue is at most half full, so a device that asks faster than it
//!   reads the answers is slowed down (and closed by the write timeout if it stops reading),
//!   and the queue overflows only on what the server sends of its own accord.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{DeviceId, Message, RejectReason};
use quinn::VarInt;
use serde::Serialize;
use tokio::sync::{mpsc as tmpsc, Notify, OwnedSemaphorePermit, Semaphore};
use transport::{Fingerprint, Revocations};

use super::config::NetLimits;
use crate::coordinator::Event;

/// QUIC application close codes the server uses.
pub(super) mod close_code {
    pub const NORMAL: u32 = 0;
    /// The device does not read what it is sent (queue full or a write timed out).
    pub const SLOW_READER: u32 = 4;
    /// The device has a live connection already.
    pub const DUPLICATE: u32 = 5;
    /// A frame did not arrive whole within the deadline.
    pub const FRAME_TIMEOUT: u32 = 6;
    /// The device sends messages faster than allowed.
    pub const FLOOD: u32 = 7;
}

/// What the server refused or cut off, and how full its queues got (see [`NetStats`]).
#[derive(Default)]
pub(super) struct Counters {
    pub handshake_failures: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub revoked_refusals: AtomicU64,
    pub retries_sent: AtomicU64,
    pub capacity_refusals: AtomicU64,
    pub address_refusals: AtomicU64,
    pub duplicate_refusals: AtomicU64,
    pub duplicate_replacements: AtomicU64,
    pub slow_readers: AtomicU64,
    pub frame_timeouts: AtomicU64,
    pub frames_refused: AtomicU64,
    pub rate_limited_messages: AtomicU64,
    pub flood_disconnects: AtomicU64,
    pub queued_bytes: AtomicUsize,
    pub peak_queued_bytes: AtomicUsize,
    pub peak_inbound_pending: AtomicUsize,
    pub inbound_bytes: AtomicUsize,
    pub peak_inbound_bytes: AtomicUsize,
}

/// The server's network counters at the end of a run: refusals by cause and queue peaks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Connections whose TLS handshake or certificate check failed.
    pub handshake_failures: u64,
    /// Connections that did not finish the handshake and open their stream in time.
    pub handshake_timeouts: u64,
    /// Connections refused or closed because the revocation list names them.
    pub revoked_refusals: u64,
    /// Connection attempts answered with a QUIC Retry (address validation).
    pub retries_sent: u64,
    /// Connection attempts refused because the server was at `max_connections`.
    pub capacity_refusals: u64,
    /// Connection attempts refused by the per-address caps.
    pub address_refusals: u64,
    /// Second connections of a device refused while its first one was active.
    pub duplicate_refusals: u64,
    /// Silent connections closed because their device connected again.
    pub duplicate_replacements: u64,
    /// Connections closed because the device did not read (queue full or write timeout).
    pub slow_readers: u64,
    /// Connections closed because a frame did not arrive whole in time.
    pub frame_timeouts: u64,
    /// Frames the codec refused (too large, other version, undecodable).
    pub frames_refused: u64,
    /// Messages dropped for exceeding a connection's message rate.
    pub rate_limited_messages: u64,
    /// Connections closed for flooding messages.
    pub flood_disconnects: u64,
    /// Most bytes queued to all devices at once.
    pub peak_queued_bytes: usize,
    /// Most messages waiting for the coordinator thread at once.
    pub peak_inbound_pending: usize,
    /// Most frame bytes waiting for the coordinator thread at once.
    pub peak_inbound_bytes: usize,
}

impl Counters {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        NetStats {
            handshake_failures: get(&self.handshake_failures),
            handshake_timeouts: get(&self.handshake_timeouts),
            revoked_refusals: get(&self.revoked_refusals),
            retries_sent: get(&self.retries_sent),
            capacity_refusals: get(&self.capacity_refusals),
            address_refusals: get(&self.address_refusals),
            duplicate_refusals: get(&self.duplicate_refusals),
            duplicate_replacements: get(&self.duplicate_replacements),
            slow_readers: get(&self.slow_readers),
            frame_timeouts: get(&self.frame_timeouts),
            frames_refused: get(&self.frames_refused),
            rate_limited_messages: get(&self.rate_limited_messages),
            flood_disconnects: get(&self.flood_disconnects),
            peak_queued_bytes: self.peak_queued_bytes.load(Ordering::SeqCst),
            peak_inbound_pending: self.peak_inbound_pending.load(Ordering::SeqCst),
            peak_inbound_bytes: self.peak_inbound_bytes.load(Ordering::SeqCst),
        }
    }
}

/// An encoded frame in a connection's queue; its bytes leave the meters when it is dropped
/// (written, or discarded with the queue).
pub(super) struct QueuedFrame {
    pub bytes: Vec<u8>,
    conn_bytes: Arc<AtomicUsize>,
    counters: Arc<Counters>,
}

impl Drop for QueuedFrame {
    fn drop(&mut self) {
        let n = self.bytes.len();
        self.conn_bytes.fetch_sub(n, Ordering::SeqCst);
        self.counters.queued_bytes.fetch_sub(n, Ordering::SeqCst);
    }
}

pub(super) enum Outbound {
    Frame(QueuedFrame),
    Close(String),
}

/// What the coordinator thread receives.
pub(super) enum Input {
    /// An event; a message holds its inbound permits until it is handled.
    Event(Event, Option<InboundPermit>),
    /// A frame refused by the codec (for counting and metrics).
    Refused(DeviceId, RejectReason),
    Shutdown,
}

/// The permits a message holds while it waits for the coordinator thread; its bytes leave the
/// meter when it is dropped.
pub(super) struct InboundPermit {
    _connection: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    metered: usize,
    counters: Arc<Counters>,
}

impl Drop for InboundPermit {
    fn drop(&mut self) {
        self.counters
            .inbound_bytes
            .fetch_sub(self.metered, Ordering::SeqCst);
    }
}

/// One authenticated connection of a device.
pub(super) struct Conn {
    pub id: u64,
    pub device: DeviceId,
    pub connection: quinn::Connection,
    pub fingerprint: Fingerprint,
    tx: tmpsc::Sender<Outbound>,
    queued_bytes: Arc<AtomicUsize>,
    /// Milliseconds (server clock) of the last frame received, or of the connection's start.
    last_rx_ms: AtomicU64,
    inbound: Arc<Semaphore>,
    /// Signalled by the writer whenever it took a frame off the queue, and when it stops.
    pub drained: Arc<Notify>,
}

impl Conn {
    /// Closes the connection at once (no flush), with a code and reason the peer can read.
    pub fn close_now(&self, code: u32, reason: &str) {
        self.connection
            .close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// A frame was received now.
    pub fn touch(&self, shared: &Shared) {
        self.last_rx_ms.store(shared.now_ms(), Ordering::SeqCst);
    }
}

/// The address a peer's per-address caps count against: an IPv4 address as it is (also when
/// written as an IPv4-mapped IPv6 address), an IPv6 address by its /64 prefix. An IPv6 host or
/// customer is usually given a whole /64, so capping single IPv6 addresses would let one
/// attacker take every slot by rotating through 2^64 of its own addresses.
pub(super) fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Live connections and slots of one address group ([`address_group`]).
#[derive(Default)]
struct IpSlots {
    connections: usize,
    handshakes: usize,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// The current connection of each device.
    conns: HashMap<DeviceId, Arc<Conn>>,
    per_ip: HashMap<IpAddr, IpSlots>,
}

/// Why a connection slot was not given.
pub(super) enum SlotRefused {
    Capacity,
    Address {
        connections: usize,
        handshakes: usize,
    },
}

/// What the server's tasks share.
pub(super) struct Shared {
    registry: Mutex<Registry>,
    inputs: Mutex<mpsc::Sender<Input>>,
    live: AtomicUsize,
    pub counters: Arc<Counters>,
    pub revocations: Revocations,
    pub max_frame_bytes: usize,
    pub limits: NetLimits,
    /// See [`NetLimits::duplicate_idle`] (resolved).
    pub duplicate_idle: Duration,
    inbound: Arc<Semaphore>,
    inbound_bytes: Arc<Semaphore>,
    start: Instant,
}

impl Shared {
    pub fn new(
        inputs: mpsc::Sender<Input>,
        revocations: Revocations,
        max_frame_bytes: usize,
        limits: NetLimits,
        duplicate_idle: Duration,
    ) -> Shared {
        Shared {
            registry: Mutex::new(Registry::default()),
            inputs: Mutex::new(inputs),
            live: AtomicUsize::new(0),
            counters: Arc::new(Counters::default()),
            revocations,
            max_frame_bytes,
            inbound: Arc::new(Semaphore::new(limits.inbound_total.max(1))),
            inbound_bytes: Arc::new(Semaphore::new(inbound_byte_permits(&limits) as usize)),
            limits,
            duplicate_idle,
            start: Instant::now(),
        }
    }

    /// Milliseconds since the server started.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Devices with a registered (authenticated, joined) connection.
    pub fn devices(&self) -> usize {
        self.registry.lock().map_or(0, |r| r.conns.len())
    }

    /// Live connections (handshaking or established).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    pub fn input(&self, input: Input) {
        if let Ok(tx) = self.inputs.lock() {
            // The coordinator thread only goes away at shutdown; later inputs do not matter.
            let _ = tx.send(input);
        }
    }

    /// A connection slot for a peer at `ip`, within the server's caps and those of its
    /// address group ([`address_group`]).
    pub fn take_slot(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, SlotRefused> {
        let ip = address_group(ip);
        let mut reg = self.registry.lock().map_err(|_| SlotRefused::Capacity)?;
        if self.live() >= self.limits.max_connections {
            return Err(SlotRefused::Capacity);
        }
        let slots = reg.per_ip.entry(ip).or_default();
        if slots.connections >= self.limits.max_connections_per_ip
            || slots.handshakes >= self.limits.max_handshakes_per_ip
        {
            let refused = SlotRefused::Address {
                connections: slots.connections,
                handshakes: slots.handshakes,
            };
            return Err(refused);
        }
        slots.connections += 1;
        slots.handshakes += 1;
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            shared: self.clone(),
            ip,
            handshaking: true,
        })
    }

    /// Registers an authenticated connection of `device`, or refuses it under the duplicate
    /// policy: while the device's current connection received a frame within
    /// `duplicate_idle`, the newcomer is refused (a stolen certificate cannot push the real
    /// device out); a current connection silent for longer is closed and replaced.
    pub fn register(
        self: &Arc<Self>,
        device: DeviceId,
        connection: quinn::Connection,
        fingerprint: Fingerprint,
    ) -> Result<(Arc<Conn>, tmpsc::Receiver<Outbound>), String> {
        let mut reg = self
            .registry
            .lock()
            .map_err(|_| "server registry unavailable".to_string())?;
        let now = self.now_ms();
        if let Some(old) = reg.conns.get(&device) {
            let silent_ms = now.saturating_sub(old.last_rx_ms.load(Ordering::SeqCst));
            let alive = old.connection.close_reason().is_none();
            if alive && silent_ms < self.duplicate_idle.as_millis() as u64 {
                Counters::bump(&self.counters.duplicate_refusals);
                return Err(format!(
                    "{device} already has an active connection (last frame {silent_ms} ms ago); a second one is refused"
                ));
            }
            Counters::bump(&self.counters.duplicate_replacements);
            old.close_now(
                close_code::DUPLICATE,
                "replaced: this connection was silent past the heartbeat window and the device connected again",
            );
        }
        reg.next_id += 1;
        let (tx, rx) = tmpsc::channel(self.limits.outbound_queue_frames.max(1));
        let conn = Arc::new(Conn {
            id: reg.next_id,
            device,
            connection,
            fingerprint,
            tx,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            last_rx_ms: AtomicU64::new(now),
            inbound: Arc::new(Semaphore::new(self.limits.inbound_per_connection.max(1))),
            drained: Arc::new(Notify::new()),
        });
        reg.conns.insert(device, conn.clone());
        Ok((conn, rx))
    }

    /// Removes `conn` if it is still its device's current connection; returns whether it was.
    pub fn unregister(&self, conn: &Conn) -> bool {
        let Ok(mut reg) = self.registry.lock() else {
            return false;
        };
        match reg.conns.get(&conn.device) {
            Some(current) if current.id == conn.id => {
                reg.conns.remove(&conn.device);
                true
            }
            _ => false,
        }
    }

    fn current(&self, device: DeviceId) -> Option<Arc<Conn>> {
        let reg = self.registry.lock().ok()?;
        reg.conns.get(&device).cloned()
    }

    /// Queues `msg` to `device`'s current connection (dropped when it has none).
    pub fn send(self: &Arc<Self>, device: DeviceId, msg: &Message) {
        match self.current(device) {
            Some(conn) => self.send_on(&conn, msg),
            None => {
                tracing::debug!(%device, kind = msg.kind(), "device not connected; message dropped")
            }
        }
    }

    /// Queues `msg` on `conn` within its budget; a device whose queue is full does not read
    /// and is closed.
    pub fn send_on(self: &Arc<Self>, conn: &Conn, msg: &Message) {
        let bytes = match protocol::encode_frame(msg) {
            Ok(b) => b,
            Err(e) => {
                return tracing::error!(device = %conn.device, kind = msg.kind(), error = %e, "cannot encode a message; dropped")
            }
        };
        let len = bytes.len();
        let queued = conn.queued_bytes.load(Ordering::SeqCst);
        if queued >= self.limits.outbound_queue_bytes {
            return self.slow_reader(
                conn,
                &format!(
                    "outbound queue over {} bytes: the device does not read",
                    self.limits.outbound_queue_bytes
                ),
            );
        }
        conn.queued_bytes.fetch_add(len, Ordering::SeqCst);
        let total = self.counters.queued_bytes.fetch_add(len, Ordering::SeqCst) + len;
        self.counters
            .peak_queued_bytes
            .fetch_max(total, Ordering::SeqCst);
        let frame = QueuedFrame {
            bytes,
            conn_bytes: conn.queued_bytes.clone(),
            counters: self.counters.clone(),
        };
        match conn.tx.try_send(Outbound::Frame(frame)) {
            Ok(()) => {}
            Err(tmpsc::error::TrySendError::Full(_)) => self.slow_reader(
                conn,
                &format!(
                    "outbound queue over {} frames: the device does not read",
                    self.limits.outbound_queue_frames
                ),
            ),
            Err(tmpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Asks `device`'s writer to flush its queue and close with `reason`; closes at once when
    /// the queue is full.
    pub fn disconnect(&self, device: DeviceId, reason: String) {
        if let Some(conn) = self.current(device) {
            self.close_after_queue(&conn, reason);
        }
    }

    pub fn close_after_queue(&self, conn: &Conn, reason: String) {
        if let Err(tmpsc::error::TrySendError::Full(Outbound::Close(reason))) =
            conn.tx.try_send(Outbound::Close(reason))
        {
            conn.close_now(close_code::NORMAL, &reason);
        }
    }

    /// Closes a connection whose device does not read.
    pub fn slow_reader(&self, conn: &Conn, reason: &str) {
        Counters::bump(&self.counters.slow_readers);
        tracing::warn!(device = %conn.device, reason, "closing a device that does not read");
        conn.close_now(close_code::SLOW_READER, reason);
    }

    /// The permits a message of `conn`, a frame of `bytes`, needs before it goes to the
    /// coordinator thread: waits until the connection's outbound queue is at most half full,
    /// then in line (first come, first served) for a permit of the connection, one of the
    /// server and the frame's bytes of the server's byte budget (the whole budget for a frame
    /// larger than it). `None` when the connection is going away.
    pub async fn inbound_permit(&self, conn: &Conn, bytes: usize) -> Option<InboundPermit> {
        let room = (self.limits.outbound_queue_frames.max(1) / 2).max(1);
        loop {
            let drained = conn.drained.notified();
            if conn.tx.is_closed() {
                return None;
            }
            if conn.tx.capacity() >= room {
                break;
            }
            drained.await;
        }
        let connection = conn.inbound.clone().acquire_owned().await.ok()?;
        let server = self.inbound.clone().acquire_owned().await.ok()?;
        let share = bytes.clamp(1, inbound_byte_permits(&self.limits) as usize) as u32;
        let in_bytes = self
            .inbound_bytes
            .clone()
            .acquire_many_owned(share)
            .await
            .ok()?;
        let pending = self.limits.inbound_total.max(1) - self.inbound.available_permits();
        self.counters
            .peak_inbound_pending
            .fetch_max(pending, Ordering::SeqCst);
        let metered = share as usize;
        let now = self
            .counters
            .inbound_bytes
            .fetch_add(metered, Ordering::SeqCst)
            + metered;
        self.counters
            .peak_inbound_bytes
            .fetch_max(now, Ordering::SeqCst);
        Some(InboundPermit {
            _connection: connection,
            _server: server,
            _bytes: in_bytes,
            metered,
            counters: self.counters.clone(),
        })
    }

    /// Closes the connections the revocation list now refuses (a device revoked while
    /// connected); each close ends its reader, which reports the disconnect.
    pub fn close_revoked(&self) {
        self.revocations.refresh();
        let list = self.revocations.list();
        let Ok(reg) = self.registry.lock() else {
            return;
        };
        for (device, conn) in &reg.conns {
            if let Err(revoked) = list.check(*device, conn.fingerprint) {
                tracing::warn!(%device, reason = %revoked, "closing a revoked device's connection");
                Counters::bump(&self.counters.revoked_refusals);
                self.close_after_queue(conn, revoked.to_string());
            }
        }
    }
}

/// A live connection's slot: counted in the server's and its address's totals (and as a
/// handshake until [`Slot::handshake_done`]) for as long as it exists.
pub(super) struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
    handshaking: bool,
}

impl Slot {
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            if let Ok(mut reg) = self.shared.registry.lock() {
                if let Some(s) = reg.per_ip.get_mut(&self.ip) {
                    s.handshakes = s.handshakes.saturating_sub(1);
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.live.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut reg) = self.shared.registry.lock() {
            if let Some(s) = reg.per_ip.get_mut(&self.ip) {
                s.connections = s.connections.saturating_sub(1);
                if self.handshaking {
                    s.handshakes = s.handshakes.saturating_sub(1);
                }
                if s.connections == 0 {
                    reg.per_ip.remove(&self.ip);
                }
            }
        }
    }
}

/// The byte budget's permits: `inbound_bytes_total`, at least one and at most what one
/// acquisition can take (`u32::MAX`).
fn inbound_byte_permits(limits: &NetLimits) -> u32 {
    limits.inbound_bytes_total.clamp(1, u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(per_ip: usize) -> Arc<Shared> {
        let (tx, _rx) = mpsc::channel();
        let limits = NetLimits {
            max_connections_per_ip: per_ip,
            max_handshakes_per_ip: per_ip,
            ..NetLimits::default()
        };
        Arc::new(Shared::new(
            tx,
            Revocations::open(std::path::Path::new("/nonexistent/fedspine-revoked.txt"))
                .expect("a missing list is empty"),
            1 << 20,
            limits,
            Duration::from_secs(1),
        ))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("a literal address")
    }

    #[test]
    fn ipv6_addresses_are_grouped_by_their_64_bit_prefix() {
        assert_eq!(
            address_group(ip("2001:db8:1:2:aaaa::1")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            address_group(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(address_group(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(address_group(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(address_group(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn rotating_through_one_64_does_not_escape_the_per_address_cap() {
        let s = shared(3);
        // An attacker holding 2001:db8:0:1::/64 tries a new address for every connection.
        let mut held = Vec::new();
        for i in 1..=3u16 {
            let a = ip(&format!("2001:db8:0:1:{i:x}::{i:x}"));
            held.push(s.take_slot(a).ok().expect("within the cap"));
        }
        let fourth = s.take_slot(ip("2001:db8:0:1:dead:beef:0:1"));
        assert!(matches!(
            fourth,
            Err(SlotRefused::Address { connections: 3, .. })
        ));
        // The neighbouring /64 and an IPv4 peer are not affected.
        assert!(s.take_slot(ip("2001:db8:0:2::1")).is_ok());
        assert!(s.take_slot(ip("192.0.2.1")).is_ok());
        // Slots come back when connections end, and the group's entry goes with the last one.
        held.clear();
        assert!(s.take_slot(ip("2001:db8:0:1::9")).is_ok());
        assert!(s.registry.lock().expect("lock").per_ip.len() <= 3);
    }
}
