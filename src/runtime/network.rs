//! A job's own network (`Network::Private`): the agent's bridge, a veth
//! pair per job into the container's network namespace, an address per job
//! slot, egress through NAT, and nftables rules in tables the agent owns
//! that keep a job from the host, from other jobs, from link-local and
//! metadata addresses and from the configured `deny` ranges.
//!
//! Driven through `ip` (iproute2) and `nft` (nftables): their batch input
//! is each tool's stable interface, `nft -f` applies a table in one
//! transaction, and a job's start spawns two short processes. Everything is
//! named from a hash of the agent's state directory, so two agents on one
//! host never touch each other's bridge, veths or tables. Never touches job
//! state or the agent's config (it gets [`NetworkSettings`]).

use std::fmt;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::sys::netlink::{self, Netlink};

/// Link-local addresses, where clouds serve instance metadata and
/// credentials: never reachable from a job unless `allow` names them.
pub const LINK_LOCAL: Cidr = Cidr {
    addr: Ipv4Addr::new(169, 254, 0, 0),
    prefix: 16,
};

/// Where an agent finds a subnet when its config names none.
pub const DEFAULT_RANGE: Cidr = Cidr {
    addr: Ipv4Addr::new(10, 250, 0, 0),
    prefix: 16,
};
/// The size of such a subnet: 2045 job addresses, more than `max_jobs`
/// may be.
const DEFAULT_PREFIX: u8 = 21;

/// What the agent's config says of private networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    /// Jobs' addresses: the bridge holds the first, job slot i the
    /// (i + 2)th. `None`: the first /21 of [`DEFAULT_RANGE`] that no route
    /// covers, looked for from one the state directory's hash picks.
    pub subnet: Option<Cidr>,
    /// Resolvers written to a job's `/etc/resolv.conf`; empty: the host's
    /// upstream resolvers (never a loopback stub).
    pub dns: Vec<Ipv4Addr>,
    /// Ranges a job may not reach, besides link-local.
    pub deny: Vec<Cidr>,
    /// Ranges a job may reach even when `deny` (or link-local) holds them.
    pub allow: Vec<Cidr>,
}

/// An IPv4 range, `a.b.c.d/n` (a bare address is a /32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    /// The `n`th address of the range (0 is the network's own).
    pub fn nth(self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - self.prefix);
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    pub fn overlaps(self, other: Cidr) -> bool {
        let mask = self.mask() & other.mask();
        u32::from(self.addr) & mask == u32::from(other.addr) & mask
    }

    /// Addresses jobs can have: all but the network's, the bridge's and
    /// the broadcast address.
    pub fn job_addresses(self) -> u64 {
        (1u64 << (32 - self.prefix)).saturating_sub(3)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 range such as \"10.250.0.0/16\""))?;
        let prefix: u8 = p
            .trim()
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to 32"))?;
        let cidr = Cidr { addr, prefix };
        if u32::from(addr) & !cidr.mask() != 0 {
            return Err(format!(
                "{s:?} has host bits set; the range is {}/{prefix}",
                Ipv4Addr::from(u32::from(addr) & cidr.mask())
            ));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot run {program}: {source}; private job networks need iproute2 and nftables installed")]
    Spawn {
        program: &'static str,
        source: io::Error,
    },
    #[error("{what} failed: {stderr}")]
    Command { what: String, stderr: String },
    #[error(
        "[network] subnet {subnet} overlaps {route} (a route on {dev}): another agent or network uses \
         it; set [network] subnet to a free private range"
    )]
    SubnetInUse {
        subnet: Cidr,
        route: String,
        dev: String,
    },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The agent's bridge and its rules; what jobs' veths are attached to.
#[derive(Debug)]
pub struct Bridge {
    /// `rn` and six hex digits of the state directory's hash.
    name: String,
    settings: NetworkSettings,
    subnet: Cidr,
    gateway: Ipv4Addr,
    /// Job slots (`max_jobs`): each has its address, veth and rule.
    slots: u32,
    resolv_conf: String,
    /// Set once [`Bridge::down`] (or drop) has removed it all.
    removed: std::sync::atomic::AtomicBool,
}

/// The prefix of the names of everything an agent with state directory
/// `state_dir` makes: its bridge is this, its veths this + `v` + slot, its
/// nftables tables `runnel-` + this.
pub fn bridge_name(state_dir: &Path) -> String {
    let digest = Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
    format!("rn{:02x}{:02x}{:02x}", digest[0], digest[1], digest[2])
}

impl Bridge {
    /// Removes what an earlier run of an agent on `state_dir` left (veths,
    /// bridge, tables), then makes the bridge, its address and its rules,
    /// and turns IPv4 forwarding on.
    pub fn up(settings: &NetworkSettings, state_dir: &Path, slots: u32) -> Result<Bridge, NetworkError> {
        let name = bridge_name(state_dir);
        let mut bridge = Bridge {
            subnet: settings.subnet.unwrap_or(DEFAULT_RANGE),
            gateway: Ipv4Addr::UNSPECIFIED,
            slots,
            name,
            settings: settings.clone(),
            resolv_conf: resolv_conf(&settings.dns),
            removed: std::sync::atomic::AtomicBool::new(false),
        };
        let removed = bridge.remove_all();
        if removed > 0 {
            tracing::warn!(links = removed, bridge = %bridge.name, "removed network links left by a previous run of the agent");
        }
        let routes = output("ip", &["-4", "-o", "route", "show", "table", "all"])?;
        bridge.subnet = match settings.subnet {
            Some(s) => {
                check_subnet_free(s, &routes)?;
                s
            }
            None => {
                let count = 1u32 << (DEFAULT_PREFIX - DEFAULT_RANGE.prefix);
                let first = u32::from(
                    bridge.name.as_bytes()[2..]
                        .iter()
                        .fold(0u8, |a, b| a.wrapping_add(*b)),
                );
                (0..count)
                    .map(|i| Cidr {
                        addr: DEFAULT_RANGE
                            .nth(((first + i) % count) << (32 - DEFAULT_PREFIX))
                            .expect("inside the range"),
                        prefix: DEFAULT_PREFIX,
                    })
                    .find(|c| check_subnet_free(*c, &routes).is_ok())
                    .ok_or_else(|| NetworkError::SubnetInUse {
                        subnet: DEFAULT_RANGE,
                        route: "every /21 of it".into(),
                        dev: "other devices".into(),
                    })?
            }
        };
        bridge.gateway = bridge.subnet.nth(1).expect("a subnet holds at least 4 addresses");
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        let sub = bridge.subnet;
        run(
            "ip",
            &["-batch", "-"],
            &format!(
                "link add {b} type bridge\naddr add {g}/{p} dev {b}\nlink set {b} up\n",
                g = bridge.gateway,
                b = bridge.name,
                p = sub.prefix
            ),
            "making the jobs' bridge",
        )?;
        run(
            "nft",
            &["-f", "-"],
            &bridge.tables(),
            "installing the jobs' nftables rules",
        )?;
        bridge.let_docker_forward()?;
        Ok(bridge)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Jobs' addresses.
    pub fn subnet(&self) -> Cidr {
        self.subnet
    }

    /// The `/etc/resolv.conf` a private job gets.
    pub fn resolv_conf(&self) -> &str {
        &self.resolv_conf
    }

    /// The address of job slot `slot`.
    pub fn address(&self, slot: u32) -> Option<Ipv4Addr> {
        let sub = self.subnet;
        (u64::from(slot) < sub.job_addresses())
            .then(|| sub.nth(slot + 2))
            .flatten()
    }

    /// Gives the network namespace of process `pid` an interface `eth0`
    /// on the bridge with slot `slot`'s address and MAC, a default route
    /// through the bridge, no IPv6, and unprivileged ping. Nothing to undo:
    /// the pair goes with the namespace (the kernel removes it when the
    /// container's last process ends), and the slot's rule is the agent's.
    /// Costs two rtnetlink requests from here and three in the namespace.
    pub fn attach(&self, slot: u32, ns: &NetNs) -> Result<(), NetworkError> {
        let addr = self.address(slot).ok_or_else(|| NetworkError::Command {
            what: format!("giving job slot {slot} an address"),
            stderr: format!("[network] subnet {} has no address for it", self.subnet),
        })?;
        let veth = self.veth(slot);
        let failed = |what: &str, e: io::Error| NetworkError::Command {
            what: format!("{what} (job slot {slot})"),
            stderr: e.to_string(),
        };
        let mut nl = Netlink::open().map_err(|e| failed("opening rtnetlink", e))?;
        let bridge = netlink::index(&self.name).map_err(|e| failed("finding the bridge", e))?;
        let mut made = nl.add_veth(&veth, bridge, "eth0", mac(addr), std::os::fd::AsFd::as_fd(&*ns.0));
        if made
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EEXIST))
        {
            // The slot's last job's pair, its namespace not yet gone.
            if let Ok(old) = netlink::index(&veth) {
                let _ = nl.delete_link(old);
            }
            made = nl.add_veth(&veth, bridge, "eth0", mac(addr), std::os::fd::AsFd::as_fd(&*ns.0));
        }
        made.map_err(|e| failed("making the job's veth pair", e))?;
        for (knob, value) in [("isolated", "1"), ("learning", "0")] {
            std::fs::write(format!("/sys/class/net/{veth}/brport/{knob}"), value)
                .map_err(|e| failed("isolating the job's bridge port", e))?;
        }
        let (prefix, gateway) = (self.subnet.prefix, self.gateway);
        in_netns(ns, move || {
            // IPv4 only: a job has no IPv6 (nothing routes it either).
            for (path, value) in [
                ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"),
                ("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"),
                // ping through ICMP datagram sockets, without CAP_NET_RAW.
                ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
            ] {
                std::fs::write(path, value)?;
            }
            let mut nl = Netlink::open()?;
            let eth0 = netlink::index("eth0")?;
            nl.add_address(eth0, addr, prefix)?;
            nl.set_up(eth0)?;
            nl.add_default_route(gateway)?;
            Ok(())
        })
        .map_err(|e| match e {
            NetworkError::Io(e) => failed("configuring the job's eth0", e),
            e => e,
        })
    }

    fn veth(&self, slot: u32) -> String {
        format!("{}v{slot}", self.name)
    }

    /// The bridge's `jobs` set, whole: each slot's veth, MAC and address.
    /// Fixed per slot, so a job's start changes no rule.
    fn slot_elements(&self) -> String {
        let elements: Vec<String> = (0..self.slots)
            .filter_map(|slot| {
                let addr = self.address(slot)?;
                let m = mac(addr);
                Some(format!(
                    "\"{}\" . {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} . {addr}",
                    self.veth(slot),
                    m[0],
                    m[1],
                    m[2],
                    m[3],
                    m[4],
                    m[5]
                ))
            })
            .collect();
        match elements.is_empty() {
            true => String::new(),
            false => format!(" elements = {{ {} }};", elements.join(", ")),
        }
    }

    /// Removes the bridge, the veths still on it and the rules (once; a
    /// drop does it too, so no way out of the agent leaves them).
    pub fn down(&self) {
        if !self.removed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.remove_all();
        }
    }

    fn table(&self) -> String {
        format!("runnel-{}", &self.name[2..])
    }

    /// The agent's tables: in the bridge family, a job's frames must carry
    /// its own interface, MAC and address (no spoofing another job); in
    /// the inet family, nothing from the bridge reaches the host itself,
    /// nothing is routed between jobs or to link-local and denied ranges,
    /// nothing from outside opens a connection to a job, and IPv6 goes
    /// nowhere; egress is masqueraded.
    fn tables(&self) -> String {
        let set = |name: &str, cidrs: &[Cidr]| {
            let elements: Vec<String> = cidrs.iter().map(Cidr::to_string).collect();
            let elements = if elements.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {} }};", elements.join(", "))
            };
            format!("  set {name} {{ type ipv4_addr; flags interval; auto-merge;{elements} }}\n")
        };
        let mut deny = vec![LINK_LOCAL];
        deny.extend(self.settings.deny.iter().copied());
        let (t, b, sub) = (self.table(), &self.name, self.subnet);
        format!(
            "table bridge {t} {{}}\ndelete table bridge {t}\ntable inet {t} {{}}\ndelete table inet {t}\n\
             table bridge {t} {{\n\
             \x20 set jobs {{ type ifname . ether_addr . ipv4_addr;{jobs} }}\n\
             \x20 chain from_jobs {{\n\
             \x20   type filter hook prerouting priority -200; policy accept;\n\
             \x20   iifname != \"{b}v*\" accept\n\
             \x20   ether type ip iifname . ether saddr . ip saddr @jobs accept\n\
             \x20   ether type arp iifname . arp saddr ether . arp saddr ip @jobs accept\n\
             \x20   drop\n\
             \x20 }}\n\
             }}\n\
             table inet {t} {{\n\
             {allow}{deny}\
             \x20 chain input {{\n\
             \x20   type filter hook input priority -10; policy accept;\n\
             \x20   iifname \"{b}\" drop\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority -10; policy accept;\n\
             \x20   iifname \"{b}\" oifname \"{b}\" drop\n\
             \x20   oifname \"{b}\" ct state established,related accept\n\
             \x20   oifname \"{b}\" drop\n\
             \x20   iifname \"{b}\" meta nfproto ipv6 drop\n\
             \x20   iifname \"{b}\" ip daddr @allow accept\n\
             \x20   iifname \"{b}\" ip daddr @deny drop\n\
             \x20 }}\n\
             \x20 chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   ip saddr {sub} oifname != \"{b}\" masquerade\n\
             \x20 }}\n\
             }}\n",
            allow = set("allow", &self.settings.allow),
            deny = set("deny", &deny),
            jobs = self.slot_elements(),
        )
    }

    /// Docker's `FORWARD` chain drops what it does not know, and a drop in
    /// any table is final: where Docker's `DOCKER-USER` chain (the one it
    /// keeps for its users' rules) exists, the bridge's traffic is accepted
    /// there, and this agent's own table still decides.
    fn let_docker_forward(&self) -> Result<(), NetworkError> {
        if !docker_user_exists() {
            return Ok(());
        }
        let (b, c) = (&self.name, self.table());
        run(
            "nft",
            &["-f", "-"],
            &format!(
                "insert rule ip filter DOCKER-USER iifname \"{b}\" accept comment \"{c}\"\n\
                 insert rule ip filter DOCKER-USER oifname \"{b}\" ct state established,related accept comment \"{c}\"\n"
            ),
            "letting the jobs' traffic past Docker's FORWARD chain (DOCKER-USER)",
        )
    }

    /// Removes everything of this agent's: links, tables, rules in
    /// DOCKER-USER. Returns how many links it removed.
    fn remove_all(&self) -> usize {
        let links = our_links(&self.name);
        for l in &links {
            let _ = run("ip", &["link", "del", l], "", "removing a link");
        }
        let t = self.table();
        let _ = run(
            "nft",
            &["-f", "-"],
            &format!(
                "table bridge {t} {{}}\ndelete table bridge {t}\ntable inet {t} {{}}\ndelete table inet {t}\n"
            ),
            "removing the jobs' nftables rules",
        );
        if docker_user_exists()
            && let Ok(out) = output("nft", &["-a", "list", "chain", "ip", "filter", "DOCKER-USER"])
        {
            for line in out.lines().filter(|l| l.contains(&format!("comment \"{t}\""))) {
                if let Some(handle) = line
                    .rsplit("# handle ")
                    .next()
                    .filter(|h| h.trim().parse::<u64>().is_ok())
                {
                    let _ = run(
                        "nft",
                        &[
                            "delete",
                            "rule",
                            "ip",
                            "filter",
                            "DOCKER-USER",
                            "handle",
                            handle.trim(),
                        ],
                        "",
                        "removing a DOCKER-USER rule",
                    );
                }
            }
        }
        links.len()
    }
}

/// A route (in `routes`, `ip -o route` lines) covering part of `subnet`
/// means another device has the range.
fn check_subnet_free(subnet: Cidr, routes: &str) -> Result<(), NetworkError> {
    for line in routes.lines() {
        let mut words = line.split_whitespace();
        let Some(mut dst) = words.next() else { continue };
        // `local 10.0.0.1 dev ...`, `broadcast ...` in the local table.
        if ["local", "broadcast", "unicast", "multicast"].contains(&dst) {
            dst = words.next().unwrap_or("");
        }
        let dev = line
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .unwrap_or("");
        let Ok(cidr) = dst.parse::<Cidr>() else { continue };
        if cidr.prefix > 0 && cidr.overlaps(subnet) {
            return Err(NetworkError::SubnetInUse {
                subnet,
                route: dst.to_string(),
                dev: dev.to_string(),
            });
        }
    }
    Ok(())
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.down();
    }
}

/// The MAC of the job with address `addr`: fixed, so the bridge's rules
/// can require it.
fn mac(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x02, 0x72, 0x6e, o[1], o[2], o[3]]
}

/// The names of links that are `prefix` or begin with `prefix` + `v`.
fn our_links(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let veth = format!("{prefix}v");
    let mut links: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n == prefix || n.starts_with(&veth))
        .collect();
    // veths before the bridge they are on.
    links.sort_by_key(|n| n == prefix);
    links
}

fn docker_user_exists() -> bool {
    output("nft", &["list", "chain", "ip", "filter", "DOCKER-USER"]).is_ok()
}

/// The resolvers a job uses: `dns`, else the host's non-loopback ones
/// (from `/etc/resolv.conf`, else systemd-resolved's upstream list), with
/// the host's `search` and `options` lines.
fn resolv_conf(dns: &[Ipv4Addr]) -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut out = String::from("# written by runnel for this job\n");
    for line in host.lines() {
        if line.starts_with("search ") || line.starts_with("options ") {
            out.push_str(line);
            out.push('\n');
        }
    }
    let servers: Vec<String> = if dns.is_empty() {
        let upstream = |text: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix("nameserver "))
                .map(str::trim)
                .filter(|s| s.parse::<std::net::IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
                .map(str::to_string)
                .collect()
        };
        let mut s = upstream(&host);
        if s.is_empty() {
            s = upstream(&std::fs::read_to_string("/run/systemd/resolve/resolv.conf").unwrap_or_default());
        }
        if s.is_empty() {
            tracing::warn!(
                "the host's resolvers are all on loopback, which a job's network cannot reach: jobs \
                 with a private network cannot resolve names; set [network] dns"
            );
        }
        s
    } else {
        dns.iter().map(Ipv4Addr::to_string).collect()
    };
    for s in servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    out
}

/// Why a service was not ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("nothing accepted connections on port {0}")]
    Port(u16),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Waits until something accepts TCP connections on each of `ports` of
/// 127.0.0.1 in the network namespace of `pid`, trying every 50 ms, until
/// `deadline` or until `give_up` is set.
pub fn wait_accepting(
    ns: &NetNs,
    ports: &[u16],
    deadline: std::time::Instant,
    give_up: &std::sync::atomic::AtomicBool,
) -> Result<(), NotReady> {
    in_netns(ns, || {
        for &port in ports {
            let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            while std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).is_err()
            {
                if std::time::Instant::now() >= deadline || give_up.load(std::sync::atomic::Ordering::Relaxed)
                {
                    return Err(NotReady::Port(port));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Ok(())
    })
}

/// Runs `work` on a thread of its own in the network namespace of `pid`
/// (`setns` moves only the calling thread; the thread ends with it, and
/// what it spawns starts in that namespace).
fn in_netns<T: Send, E: From<io::Error> + Send>(
    ns: &NetNs,
    work: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&*ns.0, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            work()
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
    })
}

/// A job's network namespace, open from its setup until the job's
/// container is gone: one handle for the veth's far end, the address
/// setup and services' readiness, which names the namespace itself (not a
/// pid that could be reused).
#[derive(Debug, Clone)]
pub struct NetNs(std::sync::Arc<std::fs::File>);

impl NetNs {
    /// The network namespace of process `pid`.
    pub fn of(pid: i32) -> io::Result<NetNs> {
        Ok(NetNs(std::sync::Arc::new(std::fs::File::open(format!(
            "/proc/{pid}/ns/net"
        ))?)))
    }
}

fn run(program: &'static str, args: &[&str], stdin: &str, what: &str) -> Result<(), NetworkError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Spawn { program, source })?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetworkError::Command {
        what: what.to_string(),
        stderr: format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

fn output(program: &'static str, args: &[&str]) -> Result<String, NetworkError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| NetworkError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            what: format!("{program} {}", args.join(" ")),
            stderr: format!("exit {}", out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_overlap() {
        let c: Cidr = "10.250.0.0/16".parse().unwrap();
        assert_eq!(c.nth(1), Some(Ipv4Addr::new(10, 250, 0, 1)));
        assert_eq!(c.nth(258), Some(Ipv4Addr::new(10, 250, 1, 2)));
        assert_eq!(c.job_addresses(), 65533);
        assert!(c.contains(Ipv4Addr::new(10, 250, 9, 9)));
        assert!(!c.contains(Ipv4Addr::new(10, 251, 0, 1)));
        assert!(c.overlaps("10.0.0.0/8".parse().unwrap()));
        assert!(c.overlaps("10.250.3.0/24".parse().unwrap()));
        assert!(!c.overlaps("10.251.0.0/16".parse().unwrap()));
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().to_string(), "1.2.3.4/32");
        let e = "10.250.0.1/16".parse::<Cidr>().unwrap_err();
        assert!(e.contains("10.250.0.0/16"), "{e}");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn names_fit_an_interface_name_and_differ_by_state_dir() {
        let a = bridge_name(Path::new("/var/lib/runnel"));
        let b = bridge_name(Path::new("/var/lib/runnel2"));
        assert_ne!(a, b);
        // IFNAMSIZ: 15 bytes; a veth adds "v" and up to 4 digits.
        assert_eq!(a.len(), 8);
        assert!(format!("{a}v1023").len() <= 15);
    }

    #[test]
    fn resolvers_given_are_written() {
        let r = resolv_conf(&[Ipv4Addr::new(198, 18, 0, 53)]);
        assert!(r.contains("nameserver 198.18.0.53\n"), "{r}");
        assert!(!r.contains("nameserver 127."), "{r}");
    }
}
