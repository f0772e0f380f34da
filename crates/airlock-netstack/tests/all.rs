//! The stack against a real Linux guest network stack: each test creates its own
//! network namespace (`ip netns add`), whose TAP `eth0` is set up by the namespace
//! backend's code and served by the netstack in this process; clients run inside with
//! `ip netns exec`. Needs root and `ip`; fails loudly otherwise. No packet leaves the
//! namespace: the handler below answers everything itself.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_netstack::{BoxFuture, DropProto, Dropped, FlowHandler, Netstack, TapLink, TcpFlow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ns {
    name: String,
}

impl Ns {
    /// A fresh netns with the guest's TAP `eth0`; returns the TAP fd.
    fn new(tag: &str) -> (Ns, OwnedFd) {
        // SAFETY: trivial getter.
        assert!(unsafe { libc::geteuid() } == 0, "netstack tests need root");
        let name = format!("airlock-nst-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip");
        assert!(st.success(), "ip netns add {name}");
        let path = format!("/var/run/netns/{name}");
        let fd = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a valid netns fd, on this throwaway thread only.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            airlock_backend::net::create_guest_tap().expect("creating the guest TAP")
        })
        .join()
        .unwrap();
        (Ns { name }, fd)
    }

    /// Run a shell command inside; returns (success, stdout).
    async fn sh(&self, script: &str) -> (bool, String) {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "bash", "-c", script])
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[derive(Default)]
struct Handler {
    flows: Mutex<Vec<SocketAddr>>,
    dns: Mutex<Vec<(Vec<u8>, SocketAddr)>>,
    drops: Mutex<Vec<Dropped>>,
}

const BIG: usize = 10 << 20;

impl FlowHandler for Handler {
    fn tcp(&self, mut flow: TcpFlow, orig_dst: SocketAddr) {
        self.flows.lock().unwrap().push(orig_dst);
        tokio::spawn(async move {
            match orig_dst.port() {
                // HTTP: answer with a body (10 MiB on /big, upload size on POST).
                80 => {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if flow.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let mut got = 0;
                    let mut buf = vec![0u8; 65536];
                    while got < len {
                        let n = flow.read(&mut buf).await.unwrap();
                        assert!(n > 0);
                        got += n;
                    }
                    let body = if head.starts_with("GET /big") {
                        vec![b'x'; BIG]
                    } else {
                        format!("dst={orig_dst} got={got}\n").into_bytes()
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    flow.write_all(resp.as_bytes()).await.unwrap();
                    flow.write_all(&body).await.unwrap();
                    flow.shutdown().await.unwrap();
                    let _ = flow.read(&mut buf).await;
                }
                // Echo.
                _ => {
                    let (mut r, mut w) = tokio::io::split(flow);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            }
        });
    }

    fn dns(&self, query: Vec<u8>, orig_dst: SocketAddr) -> BoxFuture<'static, Option<Vec<u8>>> {
        self.dns.lock().unwrap().push((query.clone(), orig_dst));
        Box::pin(async move {
            let mut a = b"answer:".to_vec();
            a.extend_from_slice(&query);
            Some(a)
        })
    }

    fn dropped(&self, d: Dropped) {
        self.drops.lock().unwrap().push(d);
    }
}

fn start(tag: &str) -> (Ns, Arc<Handler>) {
    let (ns, fd) = Ns::new(tag);
    let h = Arc::new(Handler::default());
    let link = TapLink::new(fd).unwrap();
    let stack = Netstack::new(Box::new(link), h.clone());
    tokio::spawn(async move {
        if let Err(e) = stack.run().await {
            panic!("netstack: {e}");
        }
    });
    (ns, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_to_any_address_reaches_the_handler() {
    let (ns, h) = start("tcp");
    let (ok, out) = ns
        .sh("curl -sS --max-time 10 http://1.2.3.4/hello && curl -sS --max-time 10 http://10.0.2.2/")
        .await;
    assert!(ok, "{out}");
    assert!(out.contains("dst=1.2.3.4:80 got=0"), "{out}");
    assert!(out.contains("dst=10.0.2.2:80"), "{out}");
    assert!(h
        .flows
        .lock()
        .unwrap()
        .contains(&"1.2.3.4:80".parse().unwrap()));

    // Upload and echo, data both ways.
    let (ok, out) = ns
        .sh("head -c 3000000 /dev/zero | curl -sS --max-time 20 --data-binary @- -H 'Content-Type: x' http://203.0.113.9/up")
        .await;
    assert!(
        ok && out.contains("dst=203.0.113.9:80 got=3000000"),
        "{out}"
    );
    let (ok, out) = ns
        .sh("exec 3<>/dev/tcp/198.51.100.7/7777; echo ping-pong >&3; head -n1 <&3")
        .await;
    assert!(ok && out.trim() == "ping-pong", "{out}");

    // 10 MiB download.
    let (ok, out) = ns
        .sh("curl -sS --max-time 30 -o /dev/null -w '%{size_download} %{speed_download}' http://1.2.3.4/big")
        .await;
    assert!(ok, "{out}");
    let mut it = out.split_whitespace();
    assert_eq!(it.next(), Some(BIG.to_string().as_str()), "{out}");
    eprintln!("10 MiB download: {} bytes/s", it.next().unwrap_or("?"));

    // Many concurrent flows.
    let (ok, out) = ns
        .sh("for i in $(seq 1 40); do curl -sS --max-time 20 http://10.9.$((i%4)).$i:80/c$i & done; wait")
        .await;
    assert!(ok, "{out}");
    assert_eq!(out.matches("got=0").count(), 40, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answered_everything_else_dropped() {
    let (ns, h) = start("udp");
    let py = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"q1", ("1.2.3.4", 53))
data, src = s.recvfrom(2000)
print("dns", data.decode(), src[0], src[1])
s.sendto(b"q2", ("10.0.2.3", 53))
data, src = s.recvfrom(2000)
print("dns", data.decode(), src[0], src[1])
s.sendto(b"nope", ("1.2.3.4", 9999))
s.settimeout(1)
try:
    s.recvfrom(2000); print("udp9999 answered")
except socket.timeout:
    print("udp9999 silent")
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
r.sendto(bytes([8, 0, 0xf7, 0xff, 0, 0, 0, 0]), ("1.2.3.4", 0))
r.settimeout(1)
try:
    r.recvfrom(2000); print("icmp answered")
except socket.timeout:
    print("icmp silent")
"#;
    let (ok, out) = ns.sh(&format!("/usr/bin/python3 -c '{py}'")).await;
    assert!(ok, "{out}");
    assert!(out.contains("dns answer:q1 1.2.3.4 53"), "{out}");
    assert!(out.contains("dns answer:q2 10.0.2.3 53"), "{out}");
    assert!(
        out.contains("udp9999 silent") && out.contains("icmp silent"),
        "{out}"
    );
    {
        let dns = h.dns.lock().unwrap();
        assert_eq!(dns[0], (b"q1".to_vec(), "1.2.3.4:53".parse().unwrap()));
    }
    // IPv6: turn it on inside; the kernel's first IPv6 frames (DAD, router
    // solicitation, an explicit send) are dropped and reported, never answered.
    let (ok, out) = ns
        .sh("sysctl -qw net.ipv6.conf.eth0.disable_ipv6=0; sleep 2; \
             /usr/bin/python3 -c 'import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.sendto(b\"x\", (\"ff02::1%eth0\", 53))' ; sleep 0.5")
        .await;
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let drops = h.drops.lock().unwrap();
    let udp = drops
        .iter()
        .find(|d| d.proto == DropProto::Udp)
        .unwrap_or_else(|| panic!("no UDP drop in {drops:?}"));
    assert_eq!(udp.dst, Some("1.2.3.4:9999".parse().unwrap()));
    assert!(drops
        .iter()
        .any(|d| d.proto == DropProto::Icmp && d.dst == Some("1.2.3.4:0".parse().unwrap())));
    assert!(
        drops.iter().any(|d| d.proto == DropProto::Ipv6),
        "no IPv6 drop in {drops:?}"
    );
}

#[test]
fn addressing_matches_the_backend() {
    use airlock_backend::net;
    assert_eq!(airlock_netstack::GUEST, net::GUEST_ADDR);
    assert_eq!(airlock_netstack::GATEWAY, net::GATEWAY_ADDR);
    assert_eq!(airlock_netstack::DNS_SERVER, net::DNS_ADDR);
    assert_eq!(airlock_netstack::PREFIX_LEN, net::GUEST_PREFIX_LEN);
    assert_eq!(airlock_netstack::MTU as i32, net::GUEST_MTU);
}

/// The whole capture path: netstack → airlock-egress (DNS + transparent), from real
/// clients inside the namespace (resolv.conf → 10.0.2.3 via /etc/netns/NAME/).
mod with_egress {
    use super::*;
    use airlock_egress::{Egress, EgressConfig, EventSink, SystemResolver};
    use airlock_policy::Event;

    #[derive(Default)]
    struct Sink(Mutex<Vec<Event>>);
    impl EventSink for Sink {
        fn record(&self, ev: Event) {
            self.0.lock().unwrap().push(ev);
        }
    }

    /// The supervisor's wiring (see the crate docs of airlock-netstack).
    struct ToEgress(Arc<Egress>, Mutex<Vec<Dropped>>);
    impl FlowHandler for ToEgress {
        fn tcp(&self, flow: TcpFlow, orig_dst: SocketAddr) {
            tokio::spawn(self.0.clone().serve_transparent(flow, orig_dst));
        }
        fn dns(&self, q: Vec<u8>, _d: SocketAddr) -> BoxFuture<'static, Option<Vec<u8>>> {
            let e = self.0.clone();
            Box::pin(async move { e.answer_dns(&q).await })
        }
        fn dropped(&self, d: Dropped) {
            self.0.record_dropped(d.proto.as_str(), d.dst, d.reason);
            self.1.lock().unwrap().push(d);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dns_and_flows_are_policed() {
        // A host service on 127.0.0.1 that the sandbox reaches as host.docker.internal.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut b = vec![0u8; 4096];
                    let _ = s.read(&mut b).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nhost-svc")
                        .await;
                });
            }
        });
        let (ns, fd) = Ns::new("egress");
        let etc = format!("/etc/netns/{}", ns.name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            format!("{etc}/resolv.conf"),
            airlock_backend::net::resolv_conf(),
        )
        .unwrap();
        struct RmDir(String);
        impl Drop for RmDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _rm = RmDir(etc);

        let sink = Arc::new(Sink::default());
        let policy = serde_json::from_str(&format!(
            r#"{{"mode":"allow","rules":["allow-host localhost:{port}","block-host blocked.test"]}}"#
        ))
        .unwrap();
        let egress = Arc::new(Egress::new(EgressConfig {
            sandbox: "nst".into(),
            policy,
            sink: sink.clone(),
            resolver: Arc::new(SystemResolver),
        }));
        let h = Arc::new(ToEgress(egress, Mutex::new(Vec::new())));
        let stack = Netstack::new(Box::new(TapLink::new(fd).unwrap()), h.clone());
        tokio::spawn(stack.run());

        let (ok, out) = ns
            .sh(&format!(
                "curl -sS --max-time 10 http://host.docker.internal:{port}/"
            ))
            .await;
        assert!(ok && out == "host-svc", "{out}");
        // A blocked name does not resolve; a raw connection to its address would not
        // be pinned anyway.
        let (ok, out) = ns.sh("curl -sS --max-time 10 http://blocked.test/").await;
        assert!(!ok && out.contains("resolve"), "{out}");
        // Another host port without a rule: refused by the engine.
        let (_, out) = ns
            .sh("curl -sS --max-time 10 -o /dev/null -w '%{http_code}' http://10.0.2.2:1/")
            .await;
        assert_eq!(out.trim(), "403", "{out}");
        // UDP elsewhere than port 53: nothing comes back, and it is an event.
        let (ok, out) = ns.sh("echo x > /dev/udp/1.2.3.4/9999").await;
        assert!(ok, "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let evs = sink.0.lock().unwrap();
        assert!(
            evs.iter()
                .any(|e| e.method == "udp" && e.port == 9999 && e.action == "block"),
            "{evs:#?}"
        );
        let find = |path: &str, host: &str, action: &str| {
            evs.iter()
                .any(|e| e.path == path && e.host == host && e.action == action)
        };
        assert!(find("dns", "host.docker.internal", "allow"), "{evs:#?}");
        assert!(find("transparent", "localhost", "allow"), "{evs:#?}");
        assert!(find("dns", "blocked.test", "block"), "{evs:#?}");
        assert!(find("transparent", "localhost", "block"), "{evs:#?}");
    }
}
