"""The sandbox's child side: contain this process, report what was applied, then run the program.

:mod:`remedi.evaluation.code_exec` runs this file's text as ``python -I -S -B -c <this file> <config json>`` with
cwd = a fresh temp dir (its docstring lists the layers). In order: contain the process (namespaces, Landlock,
capabilities, seccomp, rlimits; each layer skipped where the kernel or the privileges refuse it), write what was
applied to the report fd and close it, install the pure-Python guard, then execute ``main.py`` as ``__main__``.
Standard library only, and nothing runs on import: the parent imports it for the exit codes.
"""
import json
import os
import sys

EXIT_MEMORY = 113  # the program ran out of memory (reported without a traceback that would fail again)
EXIT_SETUP = 114  # containment or the guard could not be set up; no user code ran

def _contain(cfg):
    layers = {"network": [], "filesystem": [], "process": [], "limits": []}
    notes = []
    root = cfg["dir"]
    want_net = not cfg["network"]
    off = set(cfg["disable"])
    linux = sys.platform.startswith("linux")
    libc = None
    ctypes = None
    if linux:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
        except Exception as e:
            notes.append("ctypes unavailable: %r" % (e,))
            libc = None

    def err():
        e = ctypes.get_errno()
        return OSError(e, os.strerror(e))

    def prctl(*args):
        r = libc.prctl(*[ctypes.c_ulong(a) for a in args])
        if r != 0:
            raise err()
        return r

    # ---- 1. namespaces ----------------------------------------------------------------------------
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
    mount_ns = False

    def unshare(flags):
        if hasattr(os, "unshare"):
            os.unshare(flags)
        elif libc.unshare(ctypes.c_int(flags)) != 0:
            raise err()

    if libc is not None and "namespaces" not in off:
        flags = CLONE_NEWNS | (CLONE_NEWNET if want_net else 0)
        try:
            unshare(flags)
            ok = True
        except OSError as e:
            notes.append("unshare: %s" % (e,))
            ok = False
        if not ok:
            uid, gid = os.getuid(), os.getgid()
            try:
                unshare(flags | CLONE_NEWUSER)
                for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                                   ("gid_map", "%d %d 1" % (gid, gid))):
                    with open("/proc/self/" + name, "w") as f:
                        f.write(text)
                ok = True
                layers["process"].append("userns")
            except OSError as e:
                notes.append("unshare with a user namespace: %s" % (e,))
        if ok:
            mount_ns = True
            if want_net:
                layers["network"].append("netns")

    # ---- mounts: everything read-only except the temp dir -------------------------------------------
    if mount_ns:
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
        MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
        MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
        keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                               ctypes.c_void_p]

        def mount(src, target, flags):
            if libc.mount(src, os.fsencode(target), None, flags, None) != 0:
                raise err()

        def unescape(s):
            out, i = [], 0
            while i < len(s):
                if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
                    out.append(chr(int(s[i + 1:i + 4], 8)))
                    i += 4
                else:
                    out.append(s[i])
                    i += 1
            return "".join(out)

        try:
            mount(None, "/", MS_REC | MS_PRIVATE)
            mount(os.fsencode(root), root, MS_BIND | MS_REC)
            try:
                mount(None, root, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
            except OSError:
                pass
            with open("/proc/self/mountinfo") as f:
                entries = [line.split() for line in f]
            failed, root_ro = [], False
            for parts in entries:
                mp = unescape(parts[4])
                if mp == root or mp.startswith(root.rstrip("/") + "/"):
                    continue
                fl = MS_REMOUNT | MS_BIND | MS_RDONLY
                for opt in parts[5].split(","):
                    fl |= keep.get(opt, 0)
                try:
                    mount(None, mp, fl)
                    if mp == "/":
                        root_ro = True
                except OSError as e:
                    failed.append("%s (%s)" % (mp, e.strerror))
            if root_ro:
                layers["filesystem"].append("mount-ro")
            if failed:
                notes.append("read-only remount failed for: " + ", ".join(failed[:8]))
        except OSError as e:
            notes.append("mount setup: %s" % (e,))
        try:
            os.chdir(root)  # the old cwd still points into the mount underneath the bind mount
        except OSError as e:
            notes.append("chdir: %s" % (e,))

    # ---- 2. no_new_privs + Landlock ------------------------------------------------------------------
    nnp = False
    if libc is not None:
        try:
            prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            nnp = True
        except OSError as e:
            notes.append("no_new_privs: %s" % (e,))
    if libc is not None and nnp and "landlock" not in off:
        try:
            abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
            if abi < 1:
                raise err()
            fs = 0
            for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12):  # write_file, remove_*, make_*
                fs |= 1 << bit
            if abi >= 2:
                fs |= 1 << 13  # refer
            if abi >= 3:
                fs |= 1 << 14  # truncate
            net = 3 if (abi >= 4 and want_net) else 0  # bind_tcp | connect_tcp, no rule allows any
            scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals

            class RulesetAttr(ctypes.Structure):
                _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

            class PathBeneath(ctypes.Structure):
                _pack_ = 1
                _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

            attr = RulesetAttr(fs, net, scoped)
            size = 8 if abi < 4 else (16 if abi < 6 else 24)
            rfd = libc.syscall(ctypes.c_long(444), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
            if rfd < 0:
                raise err()
            file_rights = (1 << 1) | ((1 << 14) if abi >= 3 else 0)
            for path, allowed in ((root, fs), ("/dev/null", file_rights)):
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                rule = PathBeneath(allowed, pfd)
                r = libc.syscall(ctypes.c_long(445), ctypes.c_int(rfd), ctypes.c_int(1), ctypes.byref(rule),
                                 ctypes.c_uint32(0))
                os.close(pfd)
                if r != 0:
                    raise err()
            if libc.syscall(ctypes.c_long(446), ctypes.c_int(rfd), ctypes.c_uint32(0)) != 0:
                raise err()
            os.close(rfd)
            layers["filesystem"].append("landlock-abi%d" % abi)
            if net:
                layers["network"].append("landlock-tcp")
            if scoped:
                layers["process"].append("landlock-scope")
        except OSError as e:
            notes.append("landlock: %s" % (e,))

    # ---- 3. capabilities -----------------------------------------------------------------------------
    if libc is not None and "capabilities" not in off:
        try:
            try:
                with open("/proc/sys/kernel/cap_last_cap") as f:
                    last = int(f.read())
            except OSError:
                last = 63
            for cap in range(last + 1):
                try:
                    prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
                except OSError:
                    pass
            hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
            data = (ctypes.c_uint32 * 6)()
            if libc.syscall(ctypes.c_long(126), ctypes.byref(hdr), ctypes.byref(data)) != 0:  # capset
                raise err()
            with open("/proc/self/status") as f:
                eff = [ln for ln in f if ln.startswith("CapEff:")]
            if eff and int(eff[0].split()[1], 16) == 0:
                layers["process"].append("no-capabilities")
        except OSError as e:
            notes.append("capabilities: %s" % (e,))

    # ---- 4. seccomp ----------------------------------------------------------------------------------
    seccomp = False
    if libc is not None and nnp and "seccomp" not in off and os.uname().machine == "x86_64":
        try:
            LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
            prog, labels = [], {}

            def emit(code, k=0, jt=0, jf=0):
                prog.append([code, jt, jf, k & 0xFFFFFFFF])

            deny = [57, 58, 101, 129, 155, 159, 161, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172,
                    173, 175, 176, 179, 200, 227, 246, 248, 249, 250, 272, 297, 298, 303, 304, 305, 308,
                    310, 311, 313, 320, 321, 323, 424, 425, 426, 427, 428, 429, 430, 431, 432, 433, 438,
                    442]
            if want_net:
                deny.append(41)  # socket
            pid = os.getpid()
            emit(LD, 4)
            emit(JEQ, 0xC000003E, 0, "kill")  # AUDIT_ARCH_X86_64
            emit(LD, 0)
            emit(JGE, 0x40000000, "eperm", 0)  # x32 ABI
            for nr in deny:
                emit(JEQ, nr, "eperm", 0)
            emit(JEQ, 435, "enosys", 0)  # clone3: glibc falls back to clone
            emit(JEQ, 56, "clone", 0)
            emit(JEQ, 62, "signal", 0)  # kill
            emit(JEQ, 234, "signal", 0)  # tgkill
            emit(RET, 0x7FFF0000)
            labels["clone"] = len(prog)
            emit(LD, 16)
            emit(JSET, 0x00010000, "allow", "eperm")  # CLONE_THREAD
            labels["signal"] = len(prog)
            emit(LD, 16)
            emit(JEQ, pid, "allow", 0)
            emit(JEQ, 0, "allow", 0)
            emit(JEQ, -pid, "allow", "eperm")
            labels["allow"] = len(prog)
            emit(RET, 0x7FFF0000)
            labels["eperm"] = len(prog)
            emit(RET, 0x00050000 | 1)
            labels["enosys"] = len(prog)
            emit(RET, 0x00050000 | 38)
            labels["kill"] = len(prog)
            emit(RET, 0x80000000)

            class SockFilter(ctypes.Structure):
                _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                            ("k", ctypes.c_uint32)]

            class SockFprog(ctypes.Structure):
                _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

            arr = (SockFilter * len(prog))()
            for i, (code, jt, jf, k) in enumerate(prog):
                jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
                jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
                if not (0 <= jt < 256 and 0 <= jf < 256):
                    raise OSError(7, "seccomp jump out of range")
                arr[i] = SockFilter(code, jt, jf, k)
            fprog = SockFprog(len(prog), arr)
            if libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) != 0:
                raise err()
            seccomp = True
            layers["process"].append("seccomp")
            if want_net:
                layers["network"].append("seccomp")
        except OSError as e:
            notes.append("seccomp: %s" % (e,))

    # ---- 5. resource limits --------------------------------------------------------------------------
    try:
        import resource

        def setlim(name, value, hard=None):
            res = getattr(resource, name, None)
            if res is None:
                return
            cur_soft, cur_hard = resource.getrlimit(res)
            hard = value if hard is None else hard
            if cur_hard != resource.RLIM_INFINITY:
                value, hard = min(value, cur_hard), min(hard, cur_hard)
            try:
                resource.setrlimit(res, (value, hard))
                layers["limits"].append(name[7:].lower())
            except (ValueError, OSError) as e:
                notes.append("%s: %s" % (name, e))

        setlim("RLIMIT_CORE", 0)
        setlim("RLIMIT_CPU", cfg["cpu"], cfg["cpu"] + 1)
        setlim("RLIMIT_FSIZE", cfg["fsize"])
        setlim("RLIMIT_NOFILE", cfg["nofile"])
        if not seccomp and os.geteuid() != 0 and os.path.isdir("/proc"):
            uid, count = os.getuid(), 0
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        if os.stat("/proc/" + name).st_uid == uid:
                            count += 1
                    except OSError:
                        pass
            setlim("RLIMIT_NPROC", count + 32)
        setlim("RLIMIT_AS", cfg["memory"])
    except ImportError as e:
        notes.append("resource: %s" % (e,))
    return layers, notes



def _install_guard(root, network):
    import builtins, errno, io, _io, posix, shutil, subprocess
    root = os.path.realpath(root)
    prefix = root.rstrip(os.sep) + os.sep
    extra = {"/dev/null"}

    def inside(p):
        if isinstance(p, int):
            return True
        try:
            p = os.fsdecode(os.fspath(p))
        except TypeError:
            return False
        rp = os.path.realpath(p)
        return rp == root or rp.startswith(prefix) or rp in extra

    def refuse(what):
        raise PermissionError(errno.EPERM, "%s is disabled in the sandbox" % what)

    def check(p, what):
        if not inside(p):
            raise PermissionError(errno.EACCES, "%s outside the sandbox directory is not allowed: %r" % (what, p))

    real_open = io.open

    def open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(ch in mode for ch in "wax+"):
            check(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = open

    real_fileio = _io.FileIO

    class FileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if isinstance(mode, str) and any(ch in mode for ch in "wax+"):
                check(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    io.FileIO = _io.FileIO = FileIO

    real_os_open = os.open
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & wflags:
            if dir_fd is not None:
                refuse("os.open for writing with dir_fd")
            check(path, "writing")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def set_both(name, fn):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, fn)

    set_both("open", os_open)

    def path_guard(name, nargs):
        real = getattr(os, name, None)
        if real is None:
            return

        def wrapper(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None \
                    or kwargs.get("dst_dir_fd") is not None:
                refuse("os.%s with dir_fd" % name)
            for a in args[:nargs]:
                check(a, "os.%s" % name)
            for key in ("path", "src", "dst"):
                if key in kwargs:
                    check(kwargs[key], "os.%s" % name)
            return real(*args, **kwargs)

        wrapper.__name__ = name
        set_both(name, wrapper)

    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "lchmod", "chown", "lchown", "truncate",
                 "utime", "mkfifo", "mknod", "setxattr", "removexattr", "chflags", "lchflags"):
        path_guard(name, 1)
    for name in ("rename", "replace", "link"):
        path_guard(name, 2)
    real_symlink = os.symlink

    def symlink(src, dst, *args, **kwargs):
        check(dst, "os.symlink")
        return real_symlink(src, dst, *args, **kwargs)

    set_both("symlink", symlink)

    def disabled(name):
        def fn(*args, **kwargs):
            refuse(name)
        fn.__name__ = name.rsplit(".", 1)[-1]
        return fn

    for name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg",
                 "chroot", "fchmod", "fchown", "pidfd_open", "plock"):
        if hasattr(os, name) or hasattr(posix, name):
            set_both(name, disabled("os." + name))

    def popen_refused(*args, **kwargs):
        refuse("subprocess")

    subprocess.Popen = popen_refused
    for name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, disabled("subprocess." + name))
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = disabled("_posixsubprocess.fork_exec")
    except ImportError:
        pass
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled("shutil." + name))

    if not network:
        import socket, _socket

        class NoSocket(socket.socket):
            def __init__(self, *args, **kwargs):
                refuse("network access")

        socket.socket = socket.SocketType = NoSocket
        _socket.socket = _socket.SocketType = NoSocket
        for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(socket, name):
                setattr(socket, name, disabled("socket." + name))
            if hasattr(_socket, name):
                setattr(_socket, name, disabled("socket." + name))

    for name in ("ctypes", "_ctypes", "resource", "psutil"):
        sys.modules[name] = None


def _main(cfg):
    rfd = cfg["report_fd"]
    try:
        layers, notes = _contain(cfg)
        guard = "guard" not in cfg["disable"]
        if guard:
            layers["filesystem"].append("guard")
            layers["process"].append("guard")
            if not cfg["network"]:
                layers["network"].append("guard")
        report = json.dumps({"layers": layers, "notes": notes}).encode()
        while report:
            report = report[os.write(rfd, report):]
        os.close(rfd)
        with open(cfg["prog"], "rb") as f:
            source = f.read()
        if guard:
            _install_guard(cfg["dir"], cfg["network"])
    except BaseException as e:
        import traceback
        sys.stderr.write("sandbox setup failed: %r\n" % (e,))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_SETUP)

    import builtins, types
    mod = types.ModuleType("__main__")
    mod.__file__ = cfg["prog"]
    mod.__builtins__ = builtins
    sys.modules["__main__"] = mod
    sys.argv = [cfg["prog"]]
    try:
        code = compile(source, "main.py", "exec")
        exec(code, mod.__dict__)
    except SystemExit:
        raise
    except MemoryError as e:
        # Free what the program holds before reporting, or printing the traceback fails again.
        import traceback
        traceback.clear_frames(e.__traceback__)
        mod.__dict__.clear()
        code = None
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except BaseException:
                pass
        os._exit(EXIT_MEMORY)
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without this script's frame
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        os._exit(1)


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
