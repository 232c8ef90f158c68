"""The seccomp-BPF filter of the sandbox child (x86-64 only), as plain data.

Standard library only and free of side effects: the parent prepends this file's text to the child's
(:mod:`remedi.sandbox.child`), which runs from ``-c`` text and cannot import the package. :func:`build_filter`
returns the assembled program (``(code, jt, jf, k)`` per instruction); the child installs it with
``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)`` after ``no_new_privs``.

What the filter does, per syscall (numbers are x86-64):

* foreign ABIs (i386 via ``int 0x80``) are killed; x32 calls answer ``EPERM``;
* process creation: ``fork``/``vfork`` refused, ``clone`` only with ``CLONE_THREAD``, ``clone3`` answers
  ``ENOSYS`` so glibc falls back to ``clone`` for threads;
* signals: ``kill``/``tgkill`` only to the child itself (its pid, 0 or its process group), and ``fcntl``
  ``F_SETOWN``/``F_SETSIG``/``F_SETOWN_EX`` plus ``ioctl`` ``FIOSETOWN``/``SIOCSPGRP`` are refused, so no
  SIGIO-style signal can be aimed at another process (issue 21, item 4);
* other processes' state: ``prlimit64`` only on the child itself (pid 0 or its own pid; item 1),
  ``setpriority``, ``sched_set*``, ``ioprio_set``, ``migrate_pages``/``move_pages``, ``process_vm_*``,
  ``process_madvise``, ``kcmp``, ``pidfd_*``, ``ptrace`` refused;
* memory outside ``RLIMIT_AS``: ``memfd_create`` and ``memfd_secret`` refused (item 3);
* mount/namespace/bpf/io_uring/keyring/module/kexec/reboot/clock/swap/quota/personality syscalls refused;
* ``socket`` refused when the network is off.
"""

AUDIT_ARCH_X86_64 = 0xC000003E
RET_ALLOW, RET_KILL = 0x7FFF0000, 0x80000000
RET_EPERM, RET_ENOSYS = 0x00050000 | 1, 0x00050000 | 38
CLONE_THREAD = 0x00010000
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902

# Refused outright (EPERM). Grouped by purpose; each number is an x86-64 syscall.
DENY = (
    57, 58,  # fork, vfork
    101, 310, 311, 312, 440, 448,  # ptrace, process_vm_readv/writev, kcmp, process_madvise, process_mrelease
    129, 297, 200, 424, 434, 438,  # rt_sigqueueinfo, rt_tgsigqueueinfo, tkill, pidfd_send_signal/open/getfd
    141, 142, 144, 203, 251, 256, 279, 314,  # setpriority, sched_setparam/setscheduler/setaffinity, ioprio_set,
    #                                           migrate_pages, move_pages, sched_setattr
    319, 447,  # memfd_create, memfd_secret
    155, 161, 165, 166, 272, 308,  # pivot_root, chroot, mount, umount2, unshare, setns
    428, 429, 430, 431, 432, 433, 442,  # open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr
    159, 164, 227, 305,  # adjtimex, settimeofday, clock_settime, clock_adjtime
    163, 167, 168, 169, 170, 171, 172, 173, 179,  # acct, swapon, swapoff, reboot, sethostname, setdomainname,
    #                                               iopl, ioperm, quotactl
    175, 176, 246, 313, 320,  # init_module, delete_module, kexec_load, finit_module, kexec_file_load
    248, 249, 250,  # add_key, request_key, keyctl
    298, 321, 323, 135,  # perf_event_open, bpf, userfaultfd, personality
    303, 304,  # name_to_handle_at, open_by_handle_at
    425, 426, 427,  # io_uring_setup, io_uring_enter, io_uring_register
)
SYS_SOCKET, SYS_CLONE, SYS_CLONE3, SYS_KILL, SYS_TGKILL = 41, 56, 435, 62, 234
SYS_FCNTL, SYS_IOCTL, SYS_PRLIMIT64 = 72, 16, 302


def build_filter(pid, network):
    """The BPF program for a child whose pid is ``pid``; ``network=False`` also refuses ``socket``.

    Returns a list of ``(code, jt, jf, k)``; raises ``ValueError`` if a jump does not fit in 8 bits.
    """
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    prog, labels = [], {}

    def emit(code, k=0, jt=0, jf=0):
        prog.append([code, jt, jf, k & 0xFFFFFFFF])

    def arg(i):  # low 32 bits of syscall argument i (seccomp_data: nr, arch, ip, args[6])
        emit(LD, 16 + 8 * i)

    emit(LD, 4)
    emit(JEQ, AUDIT_ARCH_X86_64, 0, "kill")
    emit(LD, 0)
    emit(JGE, 0x40000000, "eperm", 0)  # x32 ABI
    for nr in DENY + (() if network else (SYS_SOCKET,)):
        emit(JEQ, nr, "eperm", 0)
    emit(JEQ, SYS_CLONE3, "enosys", 0)
    emit(JEQ, SYS_CLONE, "clone", 0)
    emit(JEQ, SYS_KILL, "signal", 0)
    emit(JEQ, SYS_TGKILL, "signal", 0)
    emit(JEQ, SYS_FCNTL, "fcntl", 0)
    emit(JEQ, SYS_IOCTL, "ioctl", 0)
    emit(JEQ, SYS_PRLIMIT64, "signal", 0)  # same rule: only 0 or its own pid (a negative pid is refused there)
    emit(RET, RET_ALLOW)
    labels["clone"] = len(prog)
    arg(0)
    emit(JSET, CLONE_THREAD, "allow", "eperm")
    labels["fcntl"] = len(prog)
    arg(1)
    emit(JEQ, F_SETOWN, "eperm", 0)
    emit(JEQ, F_SETSIG, "eperm", 0)
    emit(JEQ, F_SETOWN_EX, "eperm", "allow")
    labels["ioctl"] = len(prog)
    arg(1)
    emit(JEQ, FIOSETOWN, "eperm", 0)
    emit(JEQ, SIOCSPGRP, "eperm", "allow")
    labels["signal"] = len(prog)
    arg(0)
    emit(JEQ, pid, "allow", 0)
    emit(JEQ, 0, "allow", 0)
    emit(JEQ, -pid, "allow", "eperm")
    labels["allow"] = len(prog)
    emit(RET, RET_ALLOW)
    labels["eperm"] = len(prog)
    emit(RET, RET_EPERM)
    labels["enosys"] = len(prog)
    emit(RET, RET_ENOSYS)
    labels["kill"] = len(prog)
    emit(RET, RET_KILL)
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise ValueError("seccomp jump out of range at instruction %d" % i)
        out.append((code, jt, jf, k))
    return out
