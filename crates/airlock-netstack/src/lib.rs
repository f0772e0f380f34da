//! airlock-netstack: the user-space TCP/IP stack (smoltcp) that serves one sandbox's
//! network link.
//!
//! Owns: the guest's only network path. Ethernet frames arrive over a [`Link`] (a TAP
//! fd for the namespace backend, a QEMU `-netdev stream` socket for the VM backend);
//! the stack answers ARP for its own addresses, terminates every TCP connection the
//! guest opens — to *any* destination address and port — and hands each established
//! flow to a [`FlowHandler`] as an async byte stream ([`TcpFlow`]) with the flow's
//! original destination. UDP to port 53 (any address) is handed to the handler's DNS
//! callback and the answer goes back from the address the guest asked. Everything else
//! (other UDP, ICMP, IP fragments, IPv6, other ethertypes) is dropped and reported.
//!
//! Must not: decide policy, dial anything or log events itself (the handler does), or
//! open any host socket. It never forwards packets: flows exist only as byte streams.
//!
//! # Addressing (fixed, like QEMU's user networking)
//! | address          | what                                                    |
//! |------------------|---------------------------------------------------------|
//! | `10.0.2.15/24`   | the guest ([`GUEST`], [`PREFIX_LEN`])                   |
//! | `10.0.2.2`       | gateway ([`GATEWAY`]) — the default route; `10.0.2.2:3128` is the explicit proxy ([`PROXY_PORT`]); other ports on it mean the host's loopback services |
//! | `10.0.2.3`       | DNS server ([`DNS_SERVER`]) for `/etc/resolv.conf`; UDP/53 to any address is answered the same way |
//!
//! IPv6 is refused deliberately: the stack has no IPv6 address, sends no router
//! advertisements, and drops (and reports) every IPv6 frame.
//!
//! The guest link MTU is [`MTU`] (65520, as passt/slirp4netns use): fewer, larger
//! segments make the user-space path fast. TCP windows are [`Config::tcp_buffer`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress,
    IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket,
    UdpRepr,
};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

mod link;
pub use link::{Link, StreamLink, TapLink, MAX_FRAME};

/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway (default route) — the stack itself.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS server address to put in the guest's `/etc/resolv.conf`.
pub const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Prefix length of the guest network (`10.0.2.0/24`).
pub const PREFIX_LEN: u8 = 24;
/// The explicit proxy port on the gateway (`10.0.2.2:3128`).
pub const PROXY_PORT: u16 = 3128;
/// The guest link's IP MTU (set on the guest's device too).
pub const MTU: usize = 65520;
/// The stack's MAC address.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the stack hands to its owner. Methods are called on the stack's task: they must
/// not block (spawn work instead).
pub trait FlowHandler: Send + Sync + 'static {
    /// A TCP connection from the guest was established to `orig_dst` (the address and
    /// port the guest dialled). Dropping `flow` closes the connection (FIN).
    fn tcp(&self, flow: TcpFlow, orig_dst: SocketAddr);
    /// A DNS query (UDP payload) the guest sent to `orig_dst` (port 53, any address).
    /// The answer, if any, is sent back from `orig_dst`.
    fn dns(&self, query: Vec<u8>, orig_dst: SocketAddr) -> BoxFuture<'static, Option<Vec<u8>>>;
    /// A frame was dropped (rate-limited to [`Config::drop_reports_per_sec`]).
    fn dropped(&self, drop: Dropped);
}

/// Protocol of a dropped frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropProto {
    Tcp,
    Udp,
    Icmp,
    /// Another IPv4 protocol number.
    Ip(u8),
    Ipv6,
    /// Another ethertype.
    Ether(u16),
}

impl DropProto {
    /// Short name for events: `tcp`, `udp`, `icmp`, `ip`, `ipv6`, `ether`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropProto::Tcp => "tcp",
            DropProto::Udp => "udp",
            DropProto::Icmp => "icmp",
            DropProto::Ip(_) => "ip",
            DropProto::Ipv6 => "ipv6",
            DropProto::Ether(_) => "ether",
        }
    }
}

/// One dropped frame. Ports are 0 for protocols without ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub proto: DropProto,
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
    pub reason: &'static str,
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct Config {
    /// smoltcp receive and send buffer per TCP flow, bytes (the advertised window).
    pub tcp_buffer: usize,
    /// Buffer between the stack and the handler's [`TcpFlow`], bytes.
    pub flow_buffer: usize,
    /// Most simultaneous TCP flows; further SYNs are dropped and reported.
    pub max_flows: usize,
    /// Most DNS queries being answered at once; further queries are dropped.
    pub max_dns_in_flight: usize,
    /// Drop reports per second before they are suppressed (counted in the log).
    pub drop_reports_per_sec: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tcp_buffer: 1 << 20,
            flow_buffer: 256 * 1024,
            max_flows: 4096,
            max_dns_in_flight: 256,
            drop_reports_per_sec: 100,
        }
    }
}

/// One guest TCP connection, as seen by the handler: read = bytes from the guest,
/// write = bytes to the guest, shutdown = FIN to the guest.
#[derive(Debug)]
pub struct TcpFlow {
    io: DuplexStream,
    peer: SocketAddr,
}

impl TcpFlow {
    /// The guest's end of the connection (its address and source port).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for TcpFlow {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TcpFlow {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The stack serving one link. Create it, then `run` it on a tokio task.
pub struct Netstack {
    link: Box<dyn Link>,
    handler: Arc<dyn FlowHandler>,
    config: Config,
}

impl Netstack {
    pub fn new(link: Box<dyn Link>, handler: Arc<dyn FlowHandler>) -> Netstack {
        Netstack::with_config(link, handler, Config::default())
    }

    pub fn with_config(
        link: Box<dyn Link>,
        handler: Arc<dyn FlowHandler>,
        config: Config,
    ) -> Netstack {
        Netstack {
            link,
            handler,
            config,
        }
    }

    /// Serve the link until it closes (`Ok`) or fails. Runs on the current tokio task;
    /// spawns a task per DNS query.
    pub async fn run(self) -> io::Result<()> {
        let mut st = Stack::new(self.link, self.handler, self.config);
        std::future::poll_fn(|cx| st.poll(cx)).await
    }
}

/// Frames queued between the link and smoltcp.
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

/// Frames smoltcp may queue towards the link before it is told to wait.
const TX_LIMIT: usize = 512;

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut v = vec![0u8; len];
        let r = f(&mut v);
        self.0.push_back(v);
        r
    }
}

fn checksum_caps() -> ChecksumCapabilities {
    // Frames from the guest's kernel carry checksums it computed; a guest that sends bad
    // ones only hurts itself. Compute ours, skip verifying theirs (saves a pass per byte).
    let mut c = ChecksumCapabilities::default();
    c.ipv4 = Checksum::Tx;
    c.tcp = Checksum::Tx;
    c.udp = Checksum::Tx;
    c.icmpv4 = Checksum::Tx;
    c
}

impl Device for Queues {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: SmolInstant) -> Option<(RxTok, TxTok<'_>)> {
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _t: SmolInstant) -> Option<TxTok<'_>> {
        if self.tx.len() >= TX_LIMIT {
            None
        } else {
            Some(TxTok(&mut self.tx))
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU + 14;
        c.checksum = checksum_caps();
        c
    }
}

type FlowKey = (SocketAddrV4, SocketAddrV4);

struct Flow {
    handle: SocketHandle,
    key: FlowKey,
    /// The stack's end of the pipe to the handler, once handed over.
    io: Option<DuplexStream>,
    /// We told the handler the guest sent FIN.
    fin_to_app: bool,
    /// The handler closed its write side: FIN queued to the guest.
    fin_to_guest: bool,
}

/// Where a DNS answer goes.
struct DnsReply {
    guest_mac: EthernetAddress,
    guest: SocketAddrV4,
    server: SocketAddrV4,
}

struct Stack {
    link: Box<dyn Link>,
    handler: Arc<dyn FlowHandler>,
    config: Config,
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    flows: Vec<Flow>,
    by_key: HashMap<FlowKey, SocketHandle>,
    dns_tx: mpsc::UnboundedSender<(DnsReply, Vec<u8>)>,
    dns_rx: mpsc::UnboundedReceiver<(DnsReply, Vec<u8>)>,
    dns_in_flight: Arc<AtomicUsize>,
    rxbuf: Vec<u8>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    epoch: std::time::Instant,
    drop_window: std::time::Instant,
    drops_in_window: u32,
    drops_suppressed: u64,
}

fn smol_now(epoch: std::time::Instant) -> SmolInstant {
    SmolInstant::from_micros(epoch.elapsed().as_micros() as i64)
}

impl Stack {
    fn new(link: Box<dyn Link>, handler: Arc<dyn FlowHandler>, config: Config) -> Stack {
        let mut dev = Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
        };
        let epoch = std::time::Instant::now();
        let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        cfg.random_seed = epoch.elapsed().as_nanos() as u64 ^ std::process::id() as u64;
        let mut iface = Interface::new(cfg, &mut dev, smol_now(epoch));
        iface.update_ip_addrs(|a| {
            // Capacity is IFACE_MAX_ADDR_COUNT (>= 2).
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(GATEWAY), PREFIX_LEN));
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(DNS_SERVER), PREFIX_LEN));
        });
        // any_ip accepts packets for addresses routed via one of our own addresses: a
        // default route via the gateway makes the stack the terminus for every address.
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        iface.set_any_ip(true);
        let (dns_tx, dns_rx) = mpsc::unbounded_channel();
        Stack {
            link,
            handler,
            config,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            flows: Vec::new(),
            by_key: HashMap::new(),
            dns_tx,
            dns_rx,
            dns_in_flight: Arc::new(AtomicUsize::new(0)),
            rxbuf: Vec::new(),
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            epoch,
            drop_window: epoch,
            drops_in_window: 0,
            drops_suppressed: 0,
        }
    }

    fn report(&mut self, d: Dropped) {
        let now = std::time::Instant::now();
        if now.duration_since(self.drop_window) >= Duration::from_secs(1) {
            if self.drops_suppressed > 0 {
                tracing::warn!(
                    "netstack: {} drop reports suppressed (rate limit)",
                    self.drops_suppressed
                );
            }
            self.drop_window = now;
            self.drops_in_window = 0;
            self.drops_suppressed = 0;
        }
        if self.drops_in_window >= self.config.drop_reports_per_sec {
            self.drops_suppressed += 1;
            return;
        }
        self.drops_in_window += 1;
        self.handler.dropped(d);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut rounds = 0;
        loop {
            rounds += 1;
            let mut busy = false;
            // 1. Frames from the guest.
            let mut n = 0;
            while n < 256 && self.dev.rx.len() < 1024 {
                let mut buf = std::mem::take(&mut self.rxbuf);
                let r = self.link.poll_recv(cx, &mut buf);
                match r {
                    Poll::Ready(Ok(true)) => {
                        n += 1;
                        if self.inspect(&buf) {
                            self.dev.rx.push_back(buf);
                        } else {
                            self.rxbuf = buf;
                        }
                    }
                    Poll::Ready(Ok(false)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.rxbuf = buf;
                        break;
                    }
                }
            }
            busy |= n > 0;
            // 2. DNS answers.
            while let Poll::Ready(Some((to, answer))) = self.dns_rx.poll_recv(cx) {
                if let Some(f) = dns_reply_frame(&to, &answer) {
                    self.dev.tx.push_back(f);
                }
                busy = true;
            }
            // 3. The stack, then the flows, then the stack again for what they queued.
            let now = smol_now(self.epoch);
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            if self.pump(cx) {
                busy = true;
                self.iface.poll(now, &mut self.dev, &mut self.sockets);
            }
            // 4. Frames to the guest.
            let mut sent = false;
            while let Some(f) = self.dev.tx.front() {
                match self.link.poll_send(cx, f) {
                    Poll::Ready(Ok(())) => {
                        self.dev.tx.pop_front();
                        sent = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if let Poll::Ready(Err(e)) = self.link.poll_flush(cx) {
                return Poll::Ready(Err(e));
            }
            busy |= sent;
            if !busy {
                break;
            }
            if rounds >= 32 {
                // Still busy: let other tasks run, come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        // 5. Timers (retransmits, delayed ACKs, keep-alives).
        let now = smol_now(self.epoch);
        if let Some(d) = self.iface.poll_delay(now, &self.sockets) {
            // A zero delay with nothing done means smoltcp is waiting for the link (which
            // will wake us): do not spin.
            let d = d.max(smoltcp::time::Duration::from_millis(1));
            let at = tokio::time::Instant::now() + Duration::from_micros(d.total_micros());
            self.sleep.as_mut().reset(at);
            if self.sleep.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }

    /// Look at a frame from the guest. Returns whether smoltcp should get it; handles
    /// DNS and drops everything that is not ARP or IPv4 TCP.
    fn inspect(&mut self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => arp_is_for_us(eth.payload()),
            EthernetProtocol::Ipv4 => self.inspect_ipv4(eth.src_addr(), eth.payload()),
            EthernetProtocol::Ipv6 => {
                let (src, dst) = ipv6_addrs(eth.payload());
                self.report(Dropped {
                    proto: DropProto::Ipv6,
                    src: src.map(|a| SocketAddr::new(IpAddr::V6(a), 0)),
                    dst: dst.map(|a| SocketAddr::new(IpAddr::V6(a), 0)),
                    reason: "IPv6 is not available in the sandbox",
                });
                false
            }
            EthernetProtocol::Unknown(t) => {
                self.report(Dropped {
                    proto: DropProto::Ether(t),
                    src: None,
                    dst: None,
                    reason: "unsupported ethertype",
                });
                false
            }
        }
    }

    fn inspect_ipv4(&mut self, src_mac: EthernetAddress, packet: &[u8]) -> bool {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return false;
        };
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let proto = ip.next_header();
        let sa = |a: Ipv4Addr, p: u16| Some(SocketAddr::V4(SocketAddrV4::new(a, p)));
        let drop_proto = match proto {
            IpProtocol::Tcp => DropProto::Tcp,
            IpProtocol::Udp => DropProto::Udp,
            IpProtocol::Icmp => DropProto::Icmp,
            other => DropProto::Ip(u8::from(other)),
        };
        let on_link = Ipv4Addr::from(u32::from(src) & 0xffff_ff00) == Ipv4Addr::new(10, 0, 2, 0);
        if !on_link || ip.more_frags() || ip.frag_offset() != 0 {
            self.report(Dropped {
                proto: drop_proto,
                src: sa(src, 0),
                dst: sa(dst, 0),
                reason: if on_link {
                    "IP fragments are not accepted"
                } else {
                    "source address not on the sandbox network"
                },
            });
            return false;
        }
        match proto {
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    return false;
                };
                if tcp.syn() && !tcp.ack() {
                    let key = (
                        SocketAddrV4::new(src, tcp.src_port()),
                        SocketAddrV4::new(dst, tcp.dst_port()),
                    );
                    return self.on_syn(key);
                }
                true
            }
            IpProtocol::Udp => {
                let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                    return false;
                };
                let (sp, dp) = (udp.src_port(), udp.dst_port());
                if dp != 53 {
                    self.report(Dropped {
                        proto: DropProto::Udp,
                        src: sa(src, sp),
                        dst: sa(dst, dp),
                        reason: "UDP is blocked (only DNS to port 53 is answered)",
                    });
                    return false;
                }
                let max = self.config.max_dns_in_flight;
                if self.dns_in_flight.load(Ordering::Relaxed) >= max {
                    self.report(Dropped {
                        proto: DropProto::Udp,
                        src: sa(src, sp),
                        dst: sa(dst, dp),
                        reason: "too many DNS queries in flight",
                    });
                    return false;
                }
                let to = DnsReply {
                    guest_mac: src_mac,
                    guest: SocketAddrV4::new(src, sp),
                    server: SocketAddrV4::new(dst, dp),
                };
                let fut = self
                    .handler
                    .dns(udp.payload().to_vec(), SocketAddr::V4(to.server));
                let tx = self.dns_tx.clone();
                let count = self.dns_in_flight.clone();
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let answer = fut.await;
                    count.fetch_sub(1, Ordering::Relaxed);
                    if let Some(a) = answer {
                        let _ = tx.send((to, a));
                    }
                });
                false
            }
            _ => {
                self.report(Dropped {
                    proto: drop_proto,
                    src: sa(src, 0),
                    dst: sa(dst, 0),
                    reason: if proto == IpProtocol::Icmp {
                        "ICMP is blocked"
                    } else {
                        "IP protocol is blocked"
                    },
                });
                false
            }
        }
    }

    /// A SYN for `key`: make sure a listening socket exists for exactly that flow.
    fn on_syn(&mut self, key: FlowKey) -> bool {
        if let Some(&h) = self.by_key.get(&key) {
            let st = self.sockets.get::<tcp::Socket>(h).state();
            if !matches!(st, tcp::State::Closed | tcp::State::TimeWait) {
                return true; // a retransmitted SYN
            }
            // The port is being reused: forget the old connection.
            self.remove_flow(h);
        }
        if self.flows.len() >= self.config.max_flows {
            self.report(Dropped {
                proto: DropProto::Tcp,
                src: Some(SocketAddr::V4(key.0)),
                dst: Some(SocketAddr::V4(key.1)),
                reason: "too many TCP connections",
            });
            return false;
        }
        let n = self.config.tcp_buffer;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; n]),
            tcp::SocketBuffer::new(vec![0; n]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(600)));
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
        let ep = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*key.1.ip())),
            port: key.1.port(),
        };
        if s.listen(ep).is_err() {
            return false; // port 0
        }
        let h = self.sockets.add(s);
        self.by_key.insert(key, h);
        self.flows.push(Flow {
            handle: h,
            key,
            io: None,
            fin_to_app: false,
            fin_to_guest: false,
        });
        true
    }

    fn remove_flow(&mut self, h: SocketHandle) {
        if let Some(i) = self.flows.iter().position(|f| f.handle == h) {
            let f = self.flows.swap_remove(i);
            if self.by_key.get(&f.key) == Some(&h) {
                self.by_key.remove(&f.key);
            }
        }
        self.sockets.remove(h);
    }

    /// Move bytes between smoltcp sockets and the handlers' pipes; hand over newly
    /// established flows; retire closed ones. Returns whether anything moved.
    fn pump(&mut self, cx: &mut Context<'_>) -> bool {
        let mut moved = false;
        let mut dead = Vec::new();
        for f in self.flows.iter_mut() {
            let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
            let state = sock.state();
            if f.io.is_none() {
                match state {
                    tcp::State::Listen | tcp::State::SynReceived => continue,
                    tcp::State::Closed | tcp::State::TimeWait => {
                        dead.push(f.handle);
                        continue;
                    }
                    _ => {
                        // Two SYNs to one destination may be taken by each other's
                        // listener: read the endpoints from the socket itself.
                        let v4 = |e: Option<smoltcp::wire::IpEndpoint>, dflt: SocketAddrV4| match e
                        {
                            Some(smoltcp::wire::IpEndpoint {
                                addr: IpAddress::Ipv4(a),
                                port,
                            }) => SocketAddrV4::new(a, port),
                            _ => dflt,
                        };
                        let peer = v4(sock.remote_endpoint(), f.key.0);
                        let orig_dst = v4(sock.local_endpoint(), f.key.1);
                        let (ours, theirs) = tokio::io::duplex(self.config.flow_buffer);
                        f.io = Some(ours);
                        moved = true;
                        self.handler.tcp(
                            TcpFlow {
                                io: theirs,
                                peer: SocketAddr::V4(peer),
                            },
                            SocketAddr::V4(orig_dst),
                        );
                    }
                }
            }
            let Some(io) = f.io.as_mut() else { continue };
            // Guest → handler.
            let mut write_failed = false;
            while sock.can_recv() {
                let r = sock.recv(|buf| match Pin::new(&mut *io).poll_write(cx, buf) {
                    Poll::Ready(Ok(n)) => (n, Ok(n)),
                    Poll::Ready(Err(e)) => (0, Err(e)),
                    Poll::Pending => (0, Ok(0)),
                });
                match r {
                    Ok(Ok(0)) => break,
                    Ok(Ok(_)) => moved = true,
                    Ok(Err(_)) | Err(_) => {
                        write_failed = true;
                        break;
                    }
                }
            }
            if write_failed {
                // The handler dropped its end: nobody will read what the guest sends.
                sock.abort();
                moved = true;
            } else if !f.fin_to_app && !sock.may_recv() && sock.recv_queue() == 0 {
                // The guest sent FIN (or the connection ended): EOF for the handler.
                match Pin::new(&mut *io).poll_shutdown(cx) {
                    Poll::Ready(_) => {
                        f.fin_to_app = true;
                        moved = true;
                    }
                    Poll::Pending => {}
                }
            }
            // Handler → guest.
            while !f.fin_to_guest && sock.can_send() {
                let r = sock.send(|buf| {
                    let mut rb = ReadBuf::new(buf);
                    match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            (n, Some(n))
                        }
                        Poll::Ready(Err(_)) => (0, Some(0)),
                        Poll::Pending => (0, None),
                    }
                });
                match r {
                    Ok(Some(0)) => {
                        // EOF from the handler: FIN after the queued data.
                        sock.close();
                        f.fin_to_guest = true;
                        moved = true;
                    }
                    Ok(Some(_)) => moved = true,
                    Ok(None) | Err(_) => break,
                }
            }
            if matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait) {
                dead.push(f.handle);
            }
        }
        for h in dead {
            self.remove_flow(h);
            moved = true;
        }
        moved
    }
}

/// ARP requests are answered for the gateway, the DNS address and (so that flows to
/// them are captured and policed, not left hanging) other addresses of the guest
/// network — never for the asker's own address (probes, gratuitous ARP).
fn arp_is_for_us(p: &[u8]) -> bool {
    let Ok(arp) = ArpPacket::new_checked(p) else {
        return false;
    };
    let (Ok(sender), Ok(target)) = (
        <[u8; 4]>::try_from(arp.source_protocol_addr()),
        <[u8; 4]>::try_from(arp.target_protocol_addr()),
    ) else {
        return false;
    };
    let (sender, target) = (Ipv4Addr::from(sender), Ipv4Addr::from(target));
    let net =
        |a: Ipv4Addr| u32::from(a) >> (32 - PREFIX_LEN) == u32::from(GUEST) >> (32 - PREFIX_LEN);
    target != sender && target != GUEST && net(target)
}

fn ipv6_addrs(p: &[u8]) -> (Option<std::net::Ipv6Addr>, Option<std::net::Ipv6Addr>) {
    if p.len() < 40 {
        return (None, None);
    }
    let a = |o: usize| {
        let mut b = [0u8; 16];
        b.copy_from_slice(&p[o..o + 16]);
        Some(std::net::Ipv6Addr::from(b))
    };
    (a(8), a(24))
}

/// An Ethernet/IPv4/UDP frame carrying a DNS answer from `to.server` to `to.guest`.
fn dns_reply_frame(to: &DnsReply, answer: &[u8]) -> Option<Vec<u8>> {
    if answer.len() > MTU - 20 - 8 {
        return None;
    }
    let udp = UdpRepr {
        src_port: to.server.port(),
        dst_port: to.guest.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *to.server.ip(),
        dst_addr: *to.guest.ip(),
        next_header: IpProtocol::Udp,
        payload_len: 8 + answer.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GATEWAY_MAC),
        dst_addr: to.guest_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; 14 + 20 + 8 + answer.len()];
    let caps = checksum_caps();
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut pkt = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut pkt, &caps);
    let mut u = UdpPacket::new_unchecked(pkt.payload_mut());
    udp.emit(
        &mut u,
        &IpAddress::Ipv4(*to.server.ip()),
        &IpAddress::Ipv4(*to.guest.ip()),
        answer.len(),
        |b| b.copy_from_slice(answer),
        &caps,
    );
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{ArpOperation, ArpRepr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Dns;
    impl FlowHandler for Dns {
        fn tcp(&self, _flow: TcpFlow, _orig_dst: SocketAddr) {}
        fn dns(&self, q: Vec<u8>, _d: SocketAddr) -> BoxFuture<'static, Option<Vec<u8>>> {
            Box::pin(async move { Some([b"re:".as_slice(), &q].concat()) })
        }
        fn dropped(&self, _d: Dropped) {}
    }

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];

    async fn send(s: &mut tokio::net::UnixStream, f: &[u8]) {
        s.write_all(&(f.len() as u32).to_be_bytes()).await.unwrap();
        s.write_all(f).await.unwrap();
    }

    async fn recv(s: &mut tokio::net::UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).await.unwrap();
        f
    }

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(GUEST_MAC),
            source_protocol_addr: GUEST,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let mut buf = vec![0u8; 14 + arp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        buf
    }

    /// The QEMU `-netdev stream` framing, end to end: ARP for the gateway is answered,
    /// ARP for the guest's own address is not, DNS is answered from the asked address.
    #[tokio::test]
    async fn stream_link_arp_and_dns() {
        let (ours, mut guest) = tokio::net::UnixStream::pair().unwrap();
        let stack = Netstack::new(Box::new(StreamLink::new(ours)), Arc::new(Dns));
        let task = tokio::spawn(stack.run());
        send(&mut guest, &arp_request(GUEST)).await;
        send(&mut guest, &arp_request(GATEWAY)).await;
        let f = recv(&mut guest).await;
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
        match arp {
            ArpRepr::EthernetIpv4 {
                operation,
                source_hardware_addr,
                source_protocol_addr,
                ..
            } => {
                assert_eq!(operation, ArpOperation::Reply);
                assert_eq!(source_hardware_addr, EthernetAddress(GATEWAY_MAC));
                assert_eq!(source_protocol_addr, GATEWAY);
            }
            other => panic!("{other:?}"),
        }
        // A DNS query to 9.9.9.9:53, answered from 9.9.9.9:53.
        let to = DnsReply {
            guest_mac: EthernetAddress(GATEWAY_MAC),
            guest: SocketAddrV4::new(Ipv4Addr::new(9, 9, 9, 9), 53),
            server: SocketAddrV4::new(GUEST, 5353),
        };
        let mut q = dns_reply_frame(&to, b"query").unwrap();
        q[..6].copy_from_slice(&GATEWAY_MAC);
        q[6..12].copy_from_slice(&GUEST_MAC);
        send(&mut guest, &q).await;
        let f = recv(&mut guest).await;
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(
            (ip.src_addr(), ip.dst_addr()),
            (Ipv4Addr::new(9, 9, 9, 9), GUEST)
        );
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((u.src_port(), u.dst_port()), (53, 5353));
        assert_eq!(u.payload(), b"re:query");
        // The link closing ends the stack.
        drop(guest);
        task.await.unwrap().unwrap();
    }

    #[test]
    fn dns_frame_is_valid() {
        let to = DnsReply {
            guest_mac: EthernetAddress([2, 0, 0, 0, 0, 9]),
            guest: SocketAddrV4::new(GUEST, 40000),
            server: SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 53),
        };
        let f = dns_reply_frame(&to, b"hello").unwrap();
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), Ipv4Addr::new(1, 2, 3, 4));
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr())
        ));
        assert_eq!(
            (u.src_port(), u.dst_port(), u.payload()),
            (53, 40000, &b"hello"[..])
        );
    }
}
