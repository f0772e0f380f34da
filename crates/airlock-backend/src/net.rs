//! The sandbox's network device for [`crate::NetworkMode::Tap`]: a TAP `eth0` created
//! inside the sandbox's own network namespace and configured with plain ioctls (no `ip`
//! binary), and passing its fd to the supervisor over a Unix socket (`SCM_RIGHTS`).
//!
//! The addressing matches the user-space stack that serves the TAP in the supervisor
//! (`airlock-netstack`, which checks these constants in a test): guest `10.0.2.15/24`,
//! default route via `10.0.2.2`, link MTU 65520. Nothing here touches the host's
//! network namespace.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Name of the guest's device.
pub const GUEST_IFNAME: &str = "eth0";
/// The guest's address on its device.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the guest network.
pub const GUEST_PREFIX_LEN: u8 = 24;
/// The default gateway (the user-space stack).
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS server address to put into the guest's `/etc/resolv.conf`.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest device's MTU.
pub const GUEST_MTU: i32 = 65520;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const SIOCADDRT: libc::c_ulong = 0x890B;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCSIFMTU: libc::c_ulong = 0x8922;

/// `struct ifreq`: a name and a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?}"),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
    fn set_addr(&mut self, a: Ipv4Addr) {
        let sa = sockaddr_in(a);
        // SAFETY: sockaddr_in is 16 plain bytes, data has 24.
        let bytes: [u8; 16] = unsafe { std::mem::transmute(sa) };
        self.data[..16].copy_from_slice(&bytes);
    }
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { std::mem::transmute(sin) }
}

/// `struct rtentry` (x86_64/aarch64 layout).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_sock() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: s is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

fn ifreq_ioctl(sock: &OwnedFd, req: libc::c_ulong, r: &mut IfReq) -> io::Result<()> {
    // SAFETY: the ioctls used here read/write a `struct ifreq`, which IfReq mirrors.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), req as _, r as *mut IfReq) })
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut r = IfReq::new(name)?;
    ifreq_ioctl(sock, SIOCGIFFLAGS, &mut r)?;
    let flags = r.short() | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    r.set_short(flags);
    ifreq_ioctl(sock, SIOCSIFFLAGS, &mut r)
}

/// Which step of [`create_guest_tap`] failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
pub struct NetSetupError {
    pub step: &'static str,
    #[source]
    pub source: io::Error,
}

fn step<T>(step: &'static str, r: io::Result<T>) -> Result<T, NetSetupError> {
    r.map_err(|source| NetSetupError { step, source })
}

/// In the current network namespace (which must be the sandbox's own): bring `lo` up,
/// create the TAP [`GUEST_IFNAME`] (`IFF_TAP | IFF_NO_PI`), give it
/// [`GUEST_ADDR`]/[`GUEST_PREFIX_LEN`] and MTU [`GUEST_MTU`], bring it up, add the
/// default route via [`GATEWAY_ADDR`] and disable IPv6 on it (best effort). Returns the
/// TAP fd (close-on-exec); frames written to it appear on the guest's `eth0`.
///
/// Needs CAP_NET_ADMIN in the namespace and `/dev/net/tun`.
pub fn create_guest_tap() -> Result<OwnedFd, NetSetupError> {
    let sock = step("socket for interface ioctls", ioctl_sock())?;
    step("bringing lo up", set_up(&sock, "lo"))?;

    let path = c"/dev/net/tun";
    // SAFETY: open(2) of a constant NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return step("opening /dev/net/tun", Err(io::Error::last_os_error()));
    }
    // SAFETY: fd is fresh and ours.
    let tap = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut r = step("TAP name", IfReq::new(GUEST_IFNAME))?;
    r.set_short((libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short);
    step(
        "creating the TAP device (TUNSETIFF)",
        ifreq_ioctl(&tap, TUNSETIFF, &mut r),
    )?;

    let mut r = step("TAP name", IfReq::new(GUEST_IFNAME))?;
    r.set_int(GUEST_MTU);
    step(
        "setting the MTU of eth0",
        ifreq_ioctl(&sock, SIOCSIFMTU, &mut r),
    )?;
    let mut r = step("TAP name", IfReq::new(GUEST_IFNAME))?;
    r.set_addr(GUEST_ADDR);
    step(
        "setting the address of eth0",
        ifreq_ioctl(&sock, SIOCSIFADDR, &mut r),
    )?;
    let mask = Ipv4Addr::from(u32::MAX << (32 - GUEST_PREFIX_LEN));
    let mut r = step("TAP name", IfReq::new(GUEST_IFNAME))?;
    r.set_addr(mask);
    step(
        "setting the netmask of eth0",
        ifreq_ioctl(&sock, SIOCSIFNETMASK, &mut r),
    )?;
    // No IPv6 on the device at all (no link-local address, no router solicitations);
    // the stack refuses IPv6 anyway. Best effort: the sysctl may be absent.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{GUEST_IFNAME}/disable_ipv6"),
        "1",
    );
    step("bringing eth0 up", set_up(&sock, GUEST_IFNAME))?;

    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(GATEWAY_ADDR),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads a `struct rtentry`, which RtEntry mirrors; rt_dev is null.
    let r = cvt(unsafe { libc::ioctl(sock.as_raw_fd(), SIOCADDRT as _, &mut rt as *mut RtEntry) });
    step("adding the default route via 10.0.2.2", r)?;
    Ok(tap)
}

/// Send `fd` (and one byte) over the Unix socket `sock` with `SCM_RIGHTS`.
pub fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [b'T'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // u64-aligned control buffer, large enough for one int.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; the pointers set below outlive the sendmsg call, and
    // the CMSG macros stay within cbuf (CMSG_SPACE(4) <= 32 bytes).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
        loop {
            let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Receive one fd sent by [`send_fd`]. `Ok(None)` if the peer closed without sending.
/// With `nonblock`, returns `WouldBlock` when nothing is queued.
pub fn recv_fd(sock: RawFd, nonblock: bool) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: as in send_fd; a received descriptor is taken into an OwnedFd once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let flags = libc::MSG_CMSG_CLOEXEC | if nonblock { libc::MSG_DONTWAIT } else { 0 };
        let n = loop {
            let n = libc::recvmsg(sock, &mut msg, flags);
            if n >= 0 {
                break n;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no descriptor in the message",
            ));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const RawFd);
        Ok(Some(OwnedFd::from_raw_fd(fd)))
    }
}

/// A connected `AF_UNIX` `SOCK_SEQPACKET` pair (close-on-exec).
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `/etc/resolv.conf` for a sandbox in [`crate::NetworkMode::Tap`].
pub fn resolv_conf() -> String {
    format!("nameserver {DNS_ADDR}\noptions timeout:2 attempts:2\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn layouts() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
        assert_eq!(std::mem::size_of::<super::RtEntry>(), 120);
    }
}
