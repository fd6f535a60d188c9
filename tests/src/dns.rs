//! A minimal authoritative DNS server on a loopback UDP port, for resolution tests: answers A
//! queries from a table that tests change at runtime, with a 1 s TTL; unknown names get
//! NXDOMAIN, other query types an empty answer. It can be told to stop answering.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

type Table = Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>;

pub struct TestDns {
    pub addr: SocketAddr,
    table: Table,
    pub queries: Arc<AtomicU64>,
    silent: Arc<AtomicBool>,
}

impl TestDns {
    pub async fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("dns addr");
        let table: Table = Arc::default();
        let queries = Arc::new(AtomicU64::new(0));
        let silent = Arc::new(AtomicBool::new(false));
        let (t, q, quiet) = (table.clone(), queries.clone(), silent.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                q.fetch_add(1, Ordering::Relaxed);
                if quiet.load(Ordering::Relaxed) {
                    continue;
                }
                let table = t.lock().unwrap().clone();
                if let Some(resp) = answer(&buf[..n], &table) {
                    let _ = socket.send_to(&resp, peer).await;
                }
            }
        });
        Self {
            addr,
            table,
            queries,
            silent,
        }
    }

    pub fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.table
            .lock()
            .unwrap()
            .insert(name.to_string(), ips.to_vec());
    }

    /// Stop answering (queries time out), or resume.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::Relaxed);
    }
}

fn answer(q: &[u8], table: &HashMap<String, Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let end = i + 4;
    let name = labels.join(".");
    let mut resp = q.get(..end)?.to_vec();
    resp[2] = 0x81; // response, recursion desired
    let records = table.get(&name);
    resp[3] = if records.is_some() { 0x80 } else { 0x83 }; // recursion available; NXDOMAIN when unknown
    let ips: &[Ipv4Addr] = match (qtype, records) {
        (1, Some(ips)) => ips,
        _ => &[],
    };
    resp[6..8].copy_from_slice(&(ips.len() as u16).to_be_bytes());
    resp[8..12].fill(0);
    for ip in ips {
        resp.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
        resp.extend_from_slice(&1u32.to_be_bytes());
        resp.extend_from_slice(&[0, 4]);
        resp.extend_from_slice(&ip.octets());
    }
    Some(resp)
}
