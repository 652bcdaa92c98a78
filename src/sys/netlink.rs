//! The few rtnetlink requests a job's network needs, in the calling
//! thread's network namespace: a veth pair whose far end goes straight
//! into another namespace, links up or removed, an IPv4 address, a default
//! route. (The message types are rust-netlink's `netlink-packet-route`,
//! already in the tree through libcontainer.) A request is one message and
//! its acknowledgement: no process is spawned, so it costs what the kernel
//! does and little more.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_ROUTE;

/// A route netlink socket of the namespace of the thread that opened it.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends `message` and waits for the kernel's answer: `Ok` for an
    /// acknowledgement, the errno it gives otherwise.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut answer = vec![0u8; 8192];
        loop {
            let n = self.socket.recv(&mut &mut answer[..], 0)?;
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
                .map_err(|e| io::Error::other(format!("an rtnetlink answer that does not parse: {e}")))?;
            if reply.header.sequence_number != self.seq {
                continue;
            }
            return match reply.payload {
                NetlinkPayload::Error(e) => match e.code {
                    None => Ok(()),
                    Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                },
                other => Err(io::Error::other(format!(
                    "an unexpected rtnetlink answer: {other:?}"
                ))),
            };
        }
    }

    /// Makes veth `name` (up, a port of link `controller`) whose peer,
    /// `peer` with address `peer_mac`, is created in the network namespace
    /// `peer_ns` (an open `/proc/PID/ns/net`).
    pub fn add_veth(
        &mut self,
        name: &str,
        controller: u32,
        peer: &str,
        peer_mac: [u8; 6],
        peer_ns: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut far = LinkMessage::default();
        far.attributes.push(LinkAttribute::IfName(peer.to_string()));
        far.attributes.push(LinkAttribute::Address(peer_mac.to_vec()));
        far.attributes
            .push(LinkAttribute::NetNsFd(std::os::fd::AsRawFd::as_raw_fd(&peer_ns)));
        let mut near = LinkMessage::default();
        near.header.flags = LinkFlags::Up;
        near.header.change_mask = LinkFlags::Up;
        near.attributes.push(LinkAttribute::IfName(name.to_string()));
        near.attributes.push(LinkAttribute::Controller(controller));
        near.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(far))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(near), NLM_F_CREATE | NLM_F_EXCL)
    }

    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(link), 0)
    }

    /// `addr/prefix` on link `index`, with its broadcast address.
    pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = index;
        let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
        m.attributes.push(AddressAttribute::Address(IpAddr::V4(addr)));
        m.attributes.push(AddressAttribute::Broadcast(Ipv4Addr::from(
            u32::from(addr) | host_bits,
        )));
        self.request(RouteNetlinkMessage::NewAddress(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// The main table's default route, via `gateway`.
    pub fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        self.request(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
    }
}

/// The index of link `name` in the calling thread's network namespace.
pub fn index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}
