//! The Prometheus endpoint's socket: plain HTTP/1.1 on its own opt-in address, one request per
//! connection (`prometheus::respond` decides the answer), a bounded request head read within a
//! deadline, and a cap on concurrent scrapes so the endpoint cannot be used to tie the server up,
//! with a smaller cap per client address so that one slow client cannot hold every scrape slot
//! (a connection past its address's cap is closed unanswered).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::registry::Shared;
use crate::prometheus::{self, MetricsView, MAX_REQUEST_BYTES};

/// Scrapes served at once; more wait in the listen backlog.
const MAX_SCRAPES: usize = 8;
/// Scrapes one client address may hold at once.
pub const MAX_SCRAPES_PER_ADDRESS: usize = 2;
/// Time a client has to send its request head, and to take the answer.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);

/// Open scrapes per client address; an address is in the map only while it holds one, so the
/// map never holds more than [`MAX_SCRAPES`] entries.
type Held = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One open scrape of one address, given back when dropped (answered, timed out or failed).
struct Slot {
    held: Held,
    ip: IpAddr,
}

impl Slot {
    /// A slot for `ip`, or `None` when it already holds its cap.
    fn take(held: &Held, ip: IpAddr) -> Option<Slot> {
        let mut map = held.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_SCRAPES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Slot {
            held: held.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Accept scrapes until the task is aborted.
pub(super) async fn serve(
    listener: TcpListener,
    view: Arc<Mutex<MetricsView>>,
    shared: Arc<Shared>,
) {
    let permits = Arc::new(Semaphore::new(MAX_SCRAPES));
    let held: Held = Arc::default();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Prometheus listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = Slot::take(&held, peer.ip()) else {
            tracing::debug!(%peer, "Prometheus scrape refused: its address holds its share");
            continue;
        };
        let (view, shared) = (view.clone(), shared.clone());
        tokio::spawn(async move {
            if tokio::time::timeout(SCRAPE_DEADLINE, answer(stream, &view, &shared))
                .await
                .is_err()
            {
                tracing::debug!(%peer, "Prometheus scrape timed out");
            }
            drop(slot);
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, view: &Mutex<MetricsView>, shared: &Shared) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let reply = loop {
        let room = MAX_REQUEST_BYTES - head.len();
        let take = room.min(buf.len());
        let n = match stream.read(&mut buf[..take]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        head.extend_from_slice(&buf[..n]);
        let render = || {
            let mut v = view.lock().map(|v| v.clone()).unwrap_or_default();
            v.connected = shared.devices();
            prometheus::render(&v)
        };
        if let Some(r) = prometheus::respond(&head, render) {
            break r;
        }
    };
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}
