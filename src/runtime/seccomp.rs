//! The seccomp filter of every process in a job container, written once as
//! data ([`RULES`]) and turned into what each runtime needs: the OCI
//! profile (`linux.seccomp`) that runc and crun load through libseccomp,
//! and BPF programs (compiled in pure Rust by `seccompiler`) that the
//! embedded runtime installs itself just before it execs a container's
//! init or a step (libcontainer is built without libseccomp, and its
//! exec'd processes would get no filter anyway).
//!
//! The profile is Docker's default (moby `profiles/seccomp/default.json`)
//! for a container without CAP_SYS_ADMIN and the other capabilities runnel
//! drops, made stricter: an allow-list, everything else fails with EPERM.
//! No new namespaces (`unshare`, `setns`, namespace flags of `clone`), no
//! kernel keyrings, mounts, BPF, perf events, module loading, kexec,
//! `open_by_handle_at`, `userfaultfd`, reboot, swap, accounting, clock
//! setting, raw I/O ports, quotas; `personality` only with the usual
//! flags; `io_uring` is refused (Docker ≥ 25 refuses it too); `clone3`
//! answers ENOSYS so that libc falls back to `clone`, whose flags the
//! filter can see. `ptrace` is allowed, as Docker allows it on kernels
//! ≥ 4.8, where seccomp rechecks a traced process's syscalls.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscallBuilder,
};
use seccompiler::{BpfProgram, TargetArch};

/// What a syscall gets when no rule allows it.
pub const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// What the filter answers when a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Fails with this errno.
    Errno(u32),
}

/// How an argument is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    /// `arg & mask == value`.
    MaskedEq(u64),
}

/// One condition on a syscall argument. `wide` compares all 64 bits of
/// the register; otherwise only the low 32, which is what the kernel reads
/// for an `int` argument (a 64-bit `!=` on an `int` could be passed with
/// garbage in the high half).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arg {
    pub index: u8,
    pub op: Op,
    pub value: u64,
    pub wide: bool,
}

/// Syscalls that get `verdict` when every one of `args` holds. Several
/// rules for one syscall are alternatives.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub names: &'static [&'static str],
    pub verdict: Verdict,
    pub args: &'static [Arg],
}

const fn int_eq(index: u8, value: u64) -> Arg {
    Arg {
        index,
        op: Op::Eq,
        value,
        wide: false,
    }
}

/// The namespace flags of `clone`: CLONE_NEWNS, NEWCGROUP, NEWUTS,
/// NEWIPC, NEWUSER, NEWPID, NEWNET (Docker's mask).
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// Docker's unconditional allow-list, without the 32-bit-only names (the
/// filter is for the native architecture only) and without `io_uring_*`;
/// plus `fchmodat2` (`fchmodat` with flags: glibc ≥ 2.39 calls it).
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
    // Docker: on kernels >= 4.8 (seccomp sees a tracee's changed syscalls).
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    // Docker: x86 only (the names are unknown elsewhere and left out).
    "arch_prctl",
    "modify_ldt",
    // Docker: with CAP_SYS_CHROOT, which steps have.
    "chroot",
];

/// Every rule of the filter; anything else fails with [`DEFAULT_ERRNO`].
pub const RULES: &[Rule] = &[
    Rule {
        names: ALLOWED,
        verdict: Verdict::Allow,
        args: &[],
    },
    // Any socket but AF_VSOCK (40), which reaches the hypervisor.
    Rule {
        names: &["socket"],
        verdict: Verdict::Allow,
        args: &[Arg {
            index: 0,
            op: Op::Ne,
            value: libc::AF_VSOCK as u64,
            wide: false,
        }],
    },
    // personality(2) only with the flags programs ask for: PER_LINUX,
    // UNAME26, ADDR_NO_RANDOMIZE (and with PER_LINUX32), and the query.
    Rule {
        names: &["personality"],
        verdict: Verdict::Allow,
        args: &[int_eq(0, 0x0)],
    },
    Rule {
        names: &["personality"],
        verdict: Verdict::Allow,
        args: &[int_eq(0, 0x8)],
    },
    Rule {
        names: &["personality"],
        verdict: Verdict::Allow,
        args: &[int_eq(0, 0x20000)],
    },
    Rule {
        names: &["personality"],
        verdict: Verdict::Allow,
        args: &[int_eq(0, 0x20008)],
    },
    Rule {
        names: &["personality"],
        verdict: Verdict::Allow,
        args: &[int_eq(0, 0xffff_ffff)],
    },
    // Threads and processes, never new namespaces.
    Rule {
        names: &["clone"],
        verdict: Verdict::Allow,
        args: &[Arg {
            index: 0,
            op: Op::MaskedEq(CLONE_NAMESPACE_FLAGS),
            value: 0,
            wide: true,
        }],
    },
    // clone3 passes its flags in memory, out of the filter's sight: say it
    // does not exist, and libc uses clone.
    Rule {
        names: &["clone3"],
        verdict: Verdict::Errno(libc::ENOSYS as u32),
        args: &[],
    },
];

/// The OCI name of the architecture this binary runs on.
fn native_arch() -> Arch {
    match std::env::consts::ARCH {
        "aarch64" => Arch::ScmpArchAarch64,
        "riscv64" => Arch::ScmpArchRiscv64,
        _ => Arch::ScmpArchX86_64,
    }
}

/// [`RULES`] as an OCI `linux.seccomp` profile (what runc and crun load).
pub fn oci_profile() -> LinuxSeccomp {
    let syscalls = RULES
        .iter()
        .map(|rule| {
            let (action, errno) = match rule.verdict {
                Verdict::Allow => (LinuxSeccompAction::ScmpActAllow, None),
                Verdict::Errno(e) => (LinuxSeccompAction::ScmpActErrno, Some(e)),
            };
            let args: Vec<_> = rule
                .args
                .iter()
                .map(|a| {
                    let (op, value, two) = match a.op {
                        Op::Eq => (LinuxSeccompOperator::ScmpCmpEq, a.value, None),
                        Op::Ne => (LinuxSeccompOperator::ScmpCmpNe, a.value, None),
                        // libseccomp: (arg & value) == valueTwo.
                        Op::MaskedEq(mask) => (LinuxSeccompOperator::ScmpCmpMaskedEq, mask, Some(a.value)),
                    };
                    let mut b = LinuxSeccompArgBuilder::default()
                        .index(a.index as usize)
                        .value(value)
                        .op(op);
                    if let Some(two) = two {
                        b = b.value_two(two);
                    }
                    b.build().expect("argument fields are complete")
                })
                .collect();
            let mut b = LinuxSyscallBuilder::default()
                .names(rule.names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .action(action);
            if let Some(e) = errno {
                b = b.errno_ret(e);
            }
            if !args.is_empty() {
                b = b.args(args);
            }
            b.build().expect("syscall fields are complete")
        })
        .collect::<Vec<_>>();
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(DEFAULT_ERRNO)
        .architectures(vec![native_arch()])
        .syscalls(syscalls)
        .build()
        .expect("seccomp fields are complete")
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("no seccomp filter can be built for the {0} architecture")]
    Arch(&'static str),
    #[error("cannot compile the seccomp filter: {0}")]
    Compile(String),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| SeccompError::Arch(std::env::consts::ARCH))
}

/// The seccompiler JSON of one filter: `rules` get `on_match`, every
/// other syscall `on_mismatch`.
fn filter_json(
    rules: &[(&str, &[Arg])],
    on_match: serde_json::Value,
    on_mismatch: serde_json::Value,
) -> serde_json::Value {
    let filter: Vec<_> = rules
        .iter()
        .map(|(name, args)| {
            let mut rule = serde_json::json!({ "syscall": name });
            if !args.is_empty() {
                rule["args"] = args
                    .iter()
                    .map(|a| {
                        let op = match a.op {
                            Op::Eq => serde_json::json!("eq"),
                            Op::Ne => serde_json::json!("ne"),
                            Op::MaskedEq(mask) => serde_json::json!({ "masked_eq": mask }),
                        };
                        serde_json::json!({
                            "index": a.index,
                            "type": if a.wide { "qword" } else { "dword" },
                            "op": op,
                            "val": a.value,
                        })
                    })
                    .collect();
            }
            rule
        })
        .collect();
    serde_json::json!({
        "match_action": on_match,
        "mismatch_action": on_mismatch,
        "filter": filter,
    })
}

fn action_json(v: Verdict) -> serde_json::Value {
    match v {
        Verdict::Allow => serde_json::json!("allow"),
        Verdict::Errno(e) => serde_json::json!({ "errno": e }),
    }
}

/// [`RULES`] as BPF programs for this architecture, to be installed
/// together (the kernel runs every installed filter and takes the most
/// restrictive answer). The first allows what any rule names and fails
/// the rest with [`DEFAULT_ERRNO`]; one more per errno verdict answers
/// that errno for its syscalls. Names this architecture does not have
/// are left out, as libseccomp does: in an allow-list that only refuses
/// more.
pub fn bpf() -> Result<Vec<BpfProgram>, SeccompError> {
    compile(RULES)
}

fn compile(rules: &[Rule]) -> Result<Vec<BpfProgram>, SeccompError> {
    let arch = target_arch()?;
    let mut unknown: Vec<String> = Vec::new();
    loop {
        let all = entries(rules.iter(), &unknown);
        let mut doc = serde_json::Map::new();
        doc.insert(
            "0-allow".into(),
            filter_json(
                &all,
                action_json(Verdict::Allow),
                action_json(Verdict::Errno(DEFAULT_ERRNO)),
            ),
        );
        let mut errnos: Vec<u32> = rules
            .iter()
            .filter_map(|r| match r.verdict {
                Verdict::Errno(e) => Some(e),
                Verdict::Allow => None,
            })
            .collect();
        errnos.sort_unstable();
        errnos.dedup();
        for e in errnos {
            let these = entries(rules.iter().filter(|r| r.verdict == Verdict::Errno(e)), &unknown);
            if !these.is_empty() {
                doc.insert(
                    format!("errno-{e}"),
                    filter_json(
                        &these,
                        action_json(Verdict::Errno(e)),
                        action_json(Verdict::Allow),
                    ),
                );
            }
        }
        let json = serde_json::to_vec(&doc).expect("JSON of plain values");
        match seccompiler::compile_from_json(json.as_slice(), arch) {
            Ok(map) => {
                let mut filters: Vec<(String, BpfProgram)> = map.into_iter().collect();
                filters.sort_by(|a, b| a.0.cmp(&b.0));
                return Ok(filters.into_iter().map(|(_, p)| p).collect());
            }
            Err(e) => {
                // seccompiler names the first syscall its table lacks for
                // this architecture; leave it out and compile again.
                let text = e.to_string();
                match unknown_syscall(&text) {
                    Some(name) if !unknown.iter().any(|u| u == name) => unknown.push(name.to_string()),
                    _ => return Err(SeccompError::Compile(text)),
                }
            }
        }
    }
}

/// `(syscall, conditions)` of `rules`, without the `unknown` names.
fn entries<'a>(rules: impl Iterator<Item = &'a Rule>, unknown: &[String]) -> Vec<(&'a str, &'a [Arg])> {
    rules
        .flat_map(|r| r.names.iter().map(move |n| (*n, r.args)))
        .filter(|(n, _)| !unknown.iter().any(|u| u == n))
        .collect()
}

/// The syscall of seccompiler's "Invalid syscall name: NAME for given
/// arch: ARCH." error.
fn unknown_syscall(error: &str) -> Option<&str> {
    let rest = error.split("Invalid syscall name: ").nth(1)?;
    rest.split(" for given arch").next()
}

/// Installs `filters` on the calling thread (with no_new_privs, which
/// lets a process without CAP_SYS_ADMIN install one). Everything this
/// thread execs keeps them.
pub fn install(filters: &[BpfProgram]) -> Result<(), SeccompError> {
    for f in filters {
        seccompiler::apply_filter(f).map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_for<'a>(profile: &'a LinuxSeccomp, name: &str) -> Vec<&'a oci_spec::runtime::LinuxSyscall> {
        profile
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.names().iter().any(|n| n == name))
            .collect()
    }

    #[test]
    fn the_oci_profile_is_an_allow_list_without_the_dangerous_syscalls() {
        let p = oci_profile();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(libc::EPERM as u32));
        for denied in [
            "unshare",
            "setns",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "mount",
            "umount2",
            "pivot_root",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "open_by_handle_at",
            "userfaultfd",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "settimeofday",
            "clock_settime",
            "iopl",
            "ioperm",
            "lookup_dcookie",
            "quotactl",
            "io_uring_setup",
            "fsopen",
            "open_tree",
            "move_mount",
            "syslog",
        ] {
            assert!(rules_for(&p, denied).is_empty(), "{denied} is allowed");
        }
        for allowed in ["read", "execve", "ptrace", "chroot", "wait4"] {
            let r = rules_for(&p, allowed);
            assert_eq!(r.len(), 1, "{allowed}");
            assert_eq!(r[0].action(), LinuxSeccompAction::ScmpActAllow);
            assert!(r[0].args().is_none(), "{allowed}");
        }
        let clone = rules_for(&p, "clone");
        let arg = clone[0].args().as_ref().unwrap()[0];
        assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!((arg.value(), arg.value_two()), (CLONE_NAMESPACE_FLAGS, Some(0)));
        let clone3 = rules_for(&p, "clone3");
        assert_eq!(clone3[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3[0].errno_ret(), Some(libc::ENOSYS as u32));
        assert_eq!(rules_for(&p, "personality").len(), 5);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["syscalls"][7]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_name_is_a_syscall_of_this_architecture() {
        // An unknown name would be left out silently at run time; here
        // it is a typo.
        let arch = target_arch().unwrap();
        for rule in RULES {
            for name in rule.names {
                let json = serde_json::json!({
                    "f": filter_json(&[(name, &[])], action_json(Verdict::Allow), action_json(Verdict::Errno(1)))
                });
                let r = seccompiler::compile_from_json(json.to_string().as_bytes(), arch);
                assert!(r.is_ok(), "{name}: {:?}", r.err().map(|e| e.to_string()));
            }
        }
    }

    #[test]
    fn names_the_architecture_lacks_are_left_out() {
        const WITH_UNKNOWN: &[Rule] = &[Rule {
            names: &["read", "not_a_syscall", "write"],
            verdict: Verdict::Allow,
            args: &[],
        }];
        let filters = compile(WITH_UNKNOWN).unwrap();
        assert_eq!(filters.len(), 1);
        assert!(filters[0].len() > 4);
    }

    #[test]
    fn one_program_per_verdict_and_all_fit_the_kernel_limit() {
        let filters = bpf().unwrap();
        assert_eq!(filters.len(), 2, "allow-list and ENOSYS");
        assert!(filters.iter().all(|f| f.len() < 4096));
    }

    /// Runs `attack` in a forked child under the filter; its errno (0 when
    /// the call succeeded).
    fn errno_under_filter(attack: fn() -> libc::c_long) -> i32 {
        let filters = bpf().unwrap();
        // SAFETY: the child only makes raw syscalls (no allocation, no
        // locks) and leaves with _exit.
        match unsafe { libc::fork() } {
            // SAFETY: in the child, raw syscalls on a filter that outlives
            // them, then _exit; nothing allocates or takes a lock.
            0 => unsafe {
                for f in &filters {
                    let prog = libc::sock_fprog {
                        len: f.len() as u16,
                        filter: f.as_ptr() as *mut libc::sock_filter,
                    };
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog) != 0
                    {
                        libc::_exit(255);
                    }
                }
                let r = attack();
                let errno = if r < 0 { *libc::__errno_location() } else { 0 };
                libc::_exit(errno);
            },
            pid => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "the child died: {status}");
                let code = libc::WEXITSTATUS(status);
                assert_ne!(code, 255, "the filter could not be installed");
                code
            }
        }
    }

    #[test]
    fn the_filter_refuses_what_the_table_refuses() {
        // SAFETY (each closure): plain syscalls with valid or null arguments.
        // SAFETY: a plain syscall with valid or null arguments.
        let unshare = || unsafe { libc::unshare(libc::CLONE_NEWUSER) as libc::c_long };
        // SAFETY: a plain syscall with valid or null arguments.
        let keyctl = || unsafe {
            libc::syscall(libc::SYS_keyctl, 0 /* GET_KEYRING_ID */, -3, 0)
        };
        // SAFETY: a plain syscall with valid or null arguments.
        let mount = || unsafe { libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0) };
        // SAFETY: a plain syscall with valid or null arguments.
        let bpf = || unsafe { libc::syscall(libc::SYS_bpf, 0, 0, 0) };
        // SAFETY: a plain syscall with valid or null arguments.
        let perf = || unsafe { libc::syscall(libc::SYS_perf_event_open, 0, 0, -1, -1, 0) };
        // SAFETY: a plain syscall with valid or null arguments.
        let personality = || unsafe { libc::syscall(libc::SYS_personality, 0x0040_0000) };
        // SAFETY: a plain syscall with valid or null arguments.
        let vsock = || unsafe { libc::syscall(libc::SYS_socket, libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
        // SAFETY: a plain syscall with valid or null arguments.
        let vsock_high = || unsafe {
            libc::syscall(
                libc::SYS_socket,
                (1u64 << 32) | libc::AF_VSOCK as u64,
                libc::SOCK_STREAM,
                0,
            )
        };
        // SAFETY: a plain syscall with valid or null arguments.
        let clone_ns = || unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWUSER as u64 | libc::SIGCHLD as u64,
                0,
                0,
                0,
                0,
            )
        };
        // SAFETY: a plain syscall with valid or null arguments.
        let clone3 = || unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
        for (what, attack) in [
            ("unshare(CLONE_NEWUSER)", unshare as fn() -> libc::c_long),
            ("keyctl", keyctl),
            ("mount", mount),
            ("bpf", bpf),
            ("perf_event_open", perf),
            ("personality(READ_IMPLIES_EXEC)", personality),
            ("socket(AF_VSOCK)", vsock),
            ("socket(AF_VSOCK | garbage << 32)", vsock_high),
            ("clone(CLONE_NEWUSER)", clone_ns),
        ] {
            assert_eq!(errno_under_filter(attack), libc::EPERM, "{what}");
        }
        assert_eq!(errno_under_filter(clone3), libc::ENOSYS, "clone3");
        // SAFETY: a plain syscall with valid or null arguments.
        let getpid = || unsafe { libc::syscall(libc::SYS_getpid) };
        // SAFETY: a plain syscall with valid or null arguments.
        let query = || unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
        assert_eq!(errno_under_filter(getpid), 0, "getpid");
        assert_eq!(errno_under_filter(query), 0, "personality(0xffffffff)");
    }
}
