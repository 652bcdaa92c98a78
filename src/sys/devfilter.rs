//! A device allow-list for a cgroup v2 directory: on cgroup v2 the
//! kernel asks a BPF program (`BPF_PROG_TYPE_CGROUP_DEVICE`) whether a
//! process of the cgroup may open or make a device node, where v1 had the
//! `devices` controller. runc attaches one built from the spec's device
//! list; libcontainer 0.7 (without its `cgroupsv2_devices` feature)
//! attaches none, so runnel builds and attaches its own: a few
//! instructions a rule, "deny" unless a rule allows.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// A device node's kind, as the kernel's `bpf_cgroup_dev_ctx` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block = 1,
    Char = 2,
}

/// `BPF_DEVCG_ACC_*`.
pub const MKNOD: u32 = 1;
pub const READ: u32 = 2;
pub const WRITE: u32 = 4;

/// Allows `access` (a mask of [`MKNOD`], [`READ`], [`WRITE`]) to devices
/// of `kind` with `major`/`minor` (`None`: any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow {
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes (linux/bpf.h, linux/bpf_common.h).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// The program: r1 holds `struct bpf_cgroup_dev_ctx { u32 access_type;
/// u32 major; u32 minor; }`, `access_type` being `access << 16 | kind`.
/// Returns 1 (allow) at the first rule that covers the request, else 0.
fn program(rules: &[Allow]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),      // r2 = access_type
        insn(MOV_X, 3, 2, 0, 0),      // r3 = r2
        insn(AND_K, 3, 0, 0, 0xffff), // r3 = kind
        insn(MOV_X, 4, 2, 0, 0),      // r4 = r2
        insn(RSH_K, 4, 0, 0, 16),     // r4 = access
        insn(LDX_W, 5, 1, 4, 0),      // r5 = major
        insn(LDX_W, 6, 1, 8, 0),      // r6 = minor
    ];
    for rule in rules {
        let mut body = vec![insn(JNE_K, 3, 0, 0, rule.kind as i32)];
        if let Some(major) = rule.major {
            body.push(insn(JNE_K, 5, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            body.push(insn(JNE_K, 6, 0, 0, minor as i32));
        }
        // Anything asked beyond what the rule allows: not this rule.
        body.push(insn(MOV_X, 7, 4, 0, 0));
        body.push(insn(AND_K, 7, 0, 0, !(rule.access as i32) & 0x7));
        body.push(insn(JNE_K, 7, 0, 0, 0));
        body.push(insn(MOV_K, 0, 0, 0, 1));
        body.push(insn(EXIT, 0, 0, 0, 0));
        // Each "not this rule" jumps past the rest of the rule's block.
        let n = body.len();
        for (i, ins) in body.iter_mut().enumerate() {
            if ins.code == JNE_K {
                ins.off = (n - i - 1) as i16;
            }
        }
        p.extend(body);
    }
    p.push(insn(MOV_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The start of `union bpf_attr` for BPF_PROG_LOAD; the rest zero.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    rest: [u8; 80],
}

/// The start of `union bpf_attr` for BPF_PROG_ATTACH; the rest zero.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    rest: [u8; 112],
}

/// Attaches a program allowing only `rules` to the cgroup v2 directory
/// `cgroup`, beside any other (every program attached must allow an
/// access). It stays attached as long as the cgroup exists.
pub fn attach(cgroup: &Path, rules: &[Allow]) -> io::Result<()> {
    let insns = program(rules);
    let license = CString::new("GPL").expect("no NUL");
    // Without the verifier's log first (a log too small for what it
    // writes fails the load); with it, to say why, if that failed.
    let load = |log: &mut [u8]| {
        let attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            kern_version: 0,
            prog_flags: 0,
            rest: [0; 80],
        };
        // SAFETY: bpf(2) reads `attr` (alive for the call) and the
        // instructions, license and log buffer it points to, all alive
        // here; it writes at most `log_size` bytes into `log`.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &attr as *const ProgLoad,
                std::mem::size_of::<ProgLoad>(),
            )
        }
    };
    let mut fd = load(&mut []);
    if fd < 0 {
        let e = io::Error::last_os_error();
        let mut log = vec![0u8; 1 << 20];
        fd = load(&mut log);
        if fd < 0 {
            let end = log.iter().position(|b| *b == 0).unwrap_or(0);
            let verifier = String::from_utf8_lossy(&log[..end]).trim().to_string();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot load the device filter: {e} ({verifier})"),
            ));
        }
    }
    // SAFETY: a new descriptor bpf(2) returned, owned by nothing else.
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let dir = std::fs::File::open(cgroup)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", cgroup.display())))?;
    let attach = ProgAttach {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        rest: [0; 112],
    };
    // SAFETY: bpf(2) reads `attach`, alive for the call; both descriptors
    // it names are open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attach as *const ProgAttach,
            std::mem::size_of::<ProgAttach>(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot attach the device filter to {}: {e}", cgroup.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_skips_to_the_next_when_it_does_not_match() {
        let p = program(&[
            Allow {
                kind: Kind::Char,
                major: Some(1),
                minor: Some(3),
                access: READ | WRITE | MKNOD,
            },
            Allow {
                kind: Kind::Char,
                major: Some(136),
                minor: None,
                access: READ | WRITE,
            },
        ]);
        // 7 loads, 8 + 7 for the rules, 2 to deny.
        assert_eq!(p.len(), 7 + 8 + 7 + 2);
        // The first rule's tests jump to its end, the second rule's start.
        let jumps: Vec<(usize, i16)> = p
            .iter()
            .enumerate()
            .filter(|(_, i)| i.code == JNE_K)
            .map(|(at, i)| (at, i.off))
            .collect();
        assert_eq!(jumps[..4], [(7, 7), (8, 6), (9, 5), (12, 2)]);
        for (at, off) in &jumps {
            let target = at + 1 + *off as usize;
            assert!(target == 15 || target == 22, "jump from {at} lands at {target}");
        }
        assert_eq!((p[p.len() - 2].code, p[p.len() - 2].imm), (MOV_K, 0));
    }
}
