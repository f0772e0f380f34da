//! Benchmark harness for bench/transparent.sh (and the reference wiring of the netstack
//! to the egress engine): serves the TAP `eth0` of an existing network namespace with
//! the netstack, hands its flows to `Egress::serve_transparent` and its DNS queries to
//! `Egress::answer_dns`, runs the same engine as an explicit proxy on 127.0.0.1, and an
//! in-memory HTTP upstream on 127.0.0.1. Prints `READY <proxy port> <upstream port>`.
//!
//! Usage (root): `transparent_bench NETNS`

use std::net::SocketAddr;
use std::sync::Arc;

use airlock_egress::{Egress, EgressConfig, EventSink, SystemResolver};
use airlock_netstack::{BoxFuture, Dropped, FlowHandler, Netstack, TapLink, TcpFlow};
use airlock_policy::{Event, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The wiring the supervisor needs: flows → transparent path, DNS → resolver.
struct ToEgress(Arc<Egress>);

impl FlowHandler for ToEgress {
    fn tcp(&self, flow: TcpFlow, orig_dst: SocketAddr) {
        tokio::spawn(self.0.clone().serve_transparent(flow, orig_dst));
    }
    fn dns(&self, query: Vec<u8>, _orig_dst: SocketAddr) -> BoxFuture<'static, Option<Vec<u8>>> {
        let e = self.0.clone();
        Box::pin(async move { e.answer_dns(&query).await })
    }
    fn dropped(&self, d: Dropped) {
        eprintln!(
            "dropped {} {:?} -> {:?}: {}",
            d.proto.as_str(),
            d.src,
            d.dst,
            d.reason
        );
    }
}

struct Quiet;
impl EventSink for Quiet {
    fn record(&self, ev: Event) {
        if ev.action == "block" {
            eprintln!(
                "event: {} {} {}:{} {}",
                ev.path, ev.action, ev.host, ev.port, ev.reason
            );
        }
    }
}

/// `GET /N` answers N bytes; connection keep-alive.
async fn upstream(l: TcpListener) {
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let chunk = vec![b'x'; 1 << 20];
            let mut buf = Vec::new();
            let mut b = [0u8; 8192];
            loop {
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let n: usize = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.trim_start_matches('/').parse().ok())
                        .unwrap_or(0);
                    let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
                    if s.write_all(h.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(chunk.len());
                        if s.write_all(&chunk[..k]).await.is_err() {
                            return;
                        }
                        left -= k;
                    }
                }
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
        });
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ns = std::env::args()
        .nth(1)
        .expect("usage: transparent_bench NETNS");
    let path = format!("/var/run/netns/{ns}");
    let tap = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns");
        // SAFETY: setns on a valid netns fd, on this throwaway thread only.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns");
        airlock_backend::net::create_guest_tap().expect("TAP")
    })
    .join()
    .unwrap();

    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = up.local_addr().unwrap().port();
    tokio::spawn(upstream(up));
    let policy: Policy = serde_json::from_str(&format!(
        r#"{{"mode":"allow","rules":["allow-host localhost:{up_port}"]}}"#
    ))
    .unwrap();
    let egress = Arc::new(Egress::new(EgressConfig {
        sandbox: "bench".into(),
        policy,
        sink: Arc::new(Quiet),
        resolver: Arc::new(SystemResolver),
    }));
    let pl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = pl.local_addr().unwrap().port();
    tokio::spawn(egress.clone().serve_tcp(pl));

    let link = TapLink::new(tap).unwrap();
    let stack = Netstack::new(Box::new(link), Arc::new(ToEgress(egress)));
    println!("READY {proxy_port} {up_port}");
    stack.run().await.unwrap();
}
