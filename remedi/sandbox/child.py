"""The sandbox's child side: contain this process, report what was applied, run the program, mark success.

:mod:`remedi.sandbox.runner` runs this file's text (after :mod:`remedi.sandbox.seccomp`'s) as
``python -I -S -B -c <text> <config json>``, normally inside bubblewrap (:mod:`remedi.sandbox.bwrap`), with cwd
the sample's size-capped work dir. In order:

1. read the program and the per-run nonce (from a pipe the parent wrote and closed; it is never in argv, the
   environment or a file), then close the nonce pipe;
2. contain the process, one named layer after another (each skipped where the kernel or the privileges refuse
   it, and reported): :func:`layer_namespaces` + :func:`layer_mounts` (only without bubblewrap),
   :func:`layer_no_new_privs`, :func:`layer_landlock`, :func:`layer_capabilities`, :func:`layer_seccomp`,
   :func:`layer_rlimits`;
3. write what was applied as the first line of the control pipe (``report <json>``);
4. install the pure-Python guard and run ``main.py`` as ``__main__``;
5. only if the program ran to its end without an exception or ``SystemExit``, write ``ok <nonce>`` to the
   control pipe through references saved before any user code ran, flush, and ``_exit(0)``. A failure
   writes ``failed <json>`` (exception type and message, or the exit code) instead.

The parent counts a run as passed only when ``ok <nonce>`` arrived and the exit code is 0; exit code 0 on its
own (``sys.exit(0)``, ``os._exit(0)``, a replaced ``os._exit`` or ``traceback.print_exception``) is not a pass.
Standard library only, and nothing runs on import: the parent imports it for the exit codes.
"""
import json
import os
import sys

EXIT_MEMORY = 113  # the program ran out of memory (reported without a traceback that would fail again)
EXIT_SETUP = 114  # containment or the guard could not be set up; no user code ran

try:  # the parent prepends seccomp.py's text; imported only when this file is used as a module
    build_filter
except NameError:
    from remedi.sandbox.seccomp import build_filter  # noqa: F401


class _Ctx:
    """What the layers share: the config, the report being built and a libc handle (None off Linux)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.root = cfg["dir"]
        self.want_net = not cfg["network"]
        self.off = set(cfg["disable"])
        self.layers = {"network": [], "filesystem": [], "process": [], "limits": []}
        self.notes = []
        self.libc = self.ctypes = None
        self.mount_ns = self.nnp = self.seccomp = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                self.libc = ctypes.CDLL(None, use_errno=True)
                self.libc.syscall.restype = ctypes.c_long
                self.ctypes = ctypes
            except Exception as e:
                self.notes.append("ctypes unavailable: %r" % (e,))

    def err(self):
        e = self.ctypes.get_errno()
        return OSError(e, os.strerror(e))

    def prctl(self, *args):
        c = self.ctypes
        if self.libc.prctl(*[c.c_ulong(a) for a in args]) != 0:
            raise self.err()

    def syscall(self, nr, *args):
        r = self.libc.syscall(self.ctypes.c_long(nr), *args)
        if r < 0:
            raise self.err()
        return r


def layer_namespaces(x):
    """Without bubblewrap: a new mount (and network) namespace, through a user namespace if need be."""
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
    flags = CLONE_NEWNS | (CLONE_NEWNET if x.want_net else 0)

    def unshare(fl):
        if hasattr(os, "unshare"):
            os.unshare(fl)
        elif x.libc.unshare(x.ctypes.c_int(fl)) != 0:
            raise x.err()

    try:
        unshare(flags)
    except OSError as e:
        x.notes.append("unshare: %s" % (e,))
        uid, gid = os.getuid(), os.getgid()
        try:
            unshare(flags | CLONE_NEWUSER)
            for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                               ("gid_map", "%d %d 1" % (gid, gid))):
                with open("/proc/self/" + name, "w") as f:
                    f.write(text)
            x.layers["process"].append("userns")
        except OSError as e:
            x.notes.append("unshare with a user namespace: %s" % (e,))
            return
    x.mount_ns = True
    if x.want_net:
        x.layers["network"].append("netns")


def _unescape(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def layer_mounts(x, source):
    """In the private mount namespace: a size-capped tmpfs on the work dir, every other mount read-only."""
    c = x.ctypes
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
    MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
    MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
    x.libc.mount.argtypes = [c.c_char_p, c.c_char_p, c.c_char_p, c.c_ulong, c.c_char_p]
    root = x.root

    def mount(src, target, flags, fstype=None, data=None):
        if x.libc.mount(src, os.fsencode(target), fstype, flags, data) != 0:
            raise x.err()

    try:
        mount(None, "/", MS_REC | MS_PRIVATE)
        try:  # the disk cap: the work dir becomes a tmpfs of at most cfg["disk"] bytes, holding main.py again
            mount(b"tmpfs", root, MS_NOSUID | MS_NODEV, b"tmpfs", b"size=%d,mode=0700" % x.cfg["disk"])
            os.chdir(root)
            with open(x.cfg["prog"], "wb") as f:
                f.write(source)
            x.layers["filesystem"].append("disk-cap")
        except OSError as e:
            x.notes.append("tmpfs on the work dir: %s" % (e,))
            mount(os.fsencode(root), root, MS_BIND | MS_REC)
            try:
                mount(None, root, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
            except OSError:
                pass
        with open("/proc/self/mountinfo") as f:
            entries = [line.split() for line in f]
        failed, root_ro = [], False
        for parts in entries:
            mp = _unescape(parts[4])
            if mp == root or mp.startswith(root.rstrip("/") + "/"):
                continue
            fl = MS_REMOUNT | MS_BIND | MS_RDONLY
            for opt in parts[5].split(","):
                fl |= keep.get(opt, 0)
            try:
                mount(None, mp, fl)
                root_ro = root_ro or mp == "/"
            except OSError as e:
                failed.append("%s (%s)" % (mp, e.strerror))
        if root_ro:
            x.layers["filesystem"].append("mount-ro")
        if failed:
            x.notes.append("read-only remount failed for: " + ", ".join(failed[:8]))
    except OSError as e:
        x.notes.append("mount setup: %s" % (e,))
    try:
        os.chdir(root)  # the old cwd still points into the mount underneath
    except OSError as e:
        x.notes.append("chdir: %s" % (e,))


def layer_no_new_privs(x):
    """no_new_privs (Landlock and seccomp need it) and death with the parent (bwrap does that outside)."""
    try:
        x.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: a killed evaluator leaves no sample running
    except OSError as e:
        x.notes.append("pdeathsig: %s" % (e,))
    try:
        x.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        x.nnp = True
    except OSError as e:
        x.notes.append("no_new_privs: %s" % (e,))


def layer_landlock(x):
    """Write-type rights only beneath the work dir (and /dev/null); TCP and, on ABI >= 6, signals scoped."""
    c = x.ctypes
    try:
        abi = x.syscall(444, None, c.c_size_t(0), c.c_uint32(1))
        fs = 0
        for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12):  # write_file, remove_*, make_*
            fs |= 1 << bit
        if abi >= 2:
            fs |= 1 << 13  # refer
        if abi >= 3:
            fs |= 1 << 14  # truncate
        net = 3 if (abi >= 4 and x.want_net) else 0  # bind_tcp | connect_tcp, no rule allows any
        scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals

        class RulesetAttr(c.Structure):
            _fields_ = [("fs", c.c_uint64), ("net", c.c_uint64), ("scoped", c.c_uint64)]

        class PathBeneath(c.Structure):
            _pack_ = 1
            _fields_ = [("allowed", c.c_uint64), ("fd", c.c_int32)]

        attr = RulesetAttr(fs, net, scoped)
        size = 8 if abi < 4 else (16 if abi < 6 else 24)
        rfd = x.syscall(444, c.byref(attr), c.c_size_t(size), c.c_uint32(0))
        file_rights = (1 << 1) | ((1 << 14) if abi >= 3 else 0)
        for path, allowed in ((x.root, fs), ("/dev/null", file_rights)):
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                x.syscall(445, c.c_int(rfd), c.c_int(1), c.byref(PathBeneath(allowed, pfd)), c.c_uint32(0))
            finally:
                os.close(pfd)
        x.syscall(446, c.c_int(rfd), c.c_uint32(0))
        os.close(rfd)
        x.layers["filesystem"].append("landlock-abi%d" % abi)
        if net:
            x.layers["network"].append("landlock-tcp")
        if scoped:
            x.layers["process"].append("landlock-scope")
    except OSError as e:
        x.notes.append("landlock: %s" % (e,))


def layer_capabilities(x):
    """Bounding set and every capability set cleared: even uid 0 can neither remount nor undo anything."""
    c = x.ctypes
    try:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last = int(f.read())
        except OSError:
            last = 63
        for cap in range(last + 1):
            try:
                x.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
            except OSError:
                pass
        hdr = (c.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (c.c_uint32 * 6)()
        x.syscall(126, c.byref(hdr), c.byref(data))  # capset
        with open("/proc/self/status") as f:
            eff = [ln for ln in f if ln.startswith("CapEff:")]
        if eff and int(eff[0].split()[1], 16) == 0:
            x.layers["process"].append("no-capabilities")
    except OSError as e:
        x.notes.append("capabilities: %s" % (e,))


def layer_seccomp(x):
    """The filter of :mod:`remedi.sandbox.seccomp` (x86-64 only)."""
    if os.uname().machine != "x86_64":
        x.notes.append("seccomp: no filter for %s (x86-64 only)" % os.uname().machine)
        return
    c = x.ctypes
    try:
        prog = build_filter(os.getpid(), not x.want_net)

        class SockFilter(c.Structure):
            _fields_ = [("code", c.c_uint16), ("jt", c.c_uint8), ("jf", c.c_uint8), ("k", c.c_uint32)]

        class SockFprog(c.Structure):
            _fields_ = [("len", c.c_uint16), ("filter", c.POINTER(SockFilter))]

        arr = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
        fprog = SockFprog(len(prog), arr)
        if x.libc.prctl(c.c_int(22), c.c_ulong(2), c.byref(fprog), c.c_ulong(0), c.c_ulong(0)) != 0:
            raise x.err()
        x.seccomp = True
        x.layers["process"].append("seccomp")
        if x.want_net:
            x.layers["network"].append("seccomp")
    except (OSError, ValueError) as e:
        x.notes.append("seccomp: %s" % (e,))


def layer_rlimits(x):
    """CPU, file size, open files, core dumps, address space (last, so setup itself is not squeezed)."""
    try:
        import resource
    except ImportError as e:
        x.notes.append("resource: %s" % (e,))
        return
    cfg = x.cfg

    def setlim(name, value, hard=None):
        res = getattr(resource, name, None)
        if res is None:
            return
        _, cur_hard = resource.getrlimit(res)
        hard = value if hard is None else hard
        if cur_hard != resource.RLIM_INFINITY:
            value, hard = min(value, cur_hard), min(hard, cur_hard)
        try:
            resource.setrlimit(res, (value, hard))
            x.layers["limits"].append(name[7:].lower())
        except (ValueError, OSError) as e:
            x.notes.append("%s: %s" % (name, e))

    setlim("RLIMIT_CORE", 0)
    setlim("RLIMIT_CPU", cfg["cpu"], cfg["cpu"] + 1)
    setlim("RLIMIT_FSIZE", cfg["fsize"])
    setlim("RLIMIT_NOFILE", cfg["nofile"])
    if not x.seccomp and os.geteuid() != 0 and os.path.isdir("/proc"):
        # RLIMIT_NPROC counts every process of the real uid (and is ignored for root): current count + margin
        uid, count = os.getuid(), 0
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    count += os.stat("/proc/" + name).st_uid == uid
                except OSError:
                    pass
        setlim("RLIMIT_NPROC", count + 32)
    setlim("RLIMIT_AS", cfg["memory"])


def contain(cfg, source):
    """Apply every layer in order; returns (layers applied, notes on the ones skipped)."""
    x = _Ctx(cfg)
    if x.libc is not None:
        if cfg.get("outer") == "bwrap":
            # bubblewrap already made the namespaces, the read-only binds and the capped tmpfs
            x.layers["network"] += ["netns"] if x.want_net else []
            x.layers["filesystem"] += ["read-confined", "disk-cap"]
            x.layers["process"] += ["pidns", "userns"]
        elif "namespaces" not in x.off:
            layer_namespaces(x)
            if x.mount_ns:
                layer_mounts(x, source)
        layer_no_new_privs(x)
        if x.nnp and "landlock" not in x.off:
            layer_landlock(x)
        if "capabilities" not in x.off:
            layer_capabilities(x)
        if x.nnp and "seccomp" not in x.off:
            layer_seccomp(x)
    layer_rlimits(x)
    return x.layers, x.notes


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


def _read_all(fd):
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _main(cfg):
    ctl = cfg["ctl_fd"]
    # References the program cannot replace for us: taken before any of its code runs.
    write, exit_, dumps = os.write, os._exit, json.dumps
    streams = (sys.stdout, sys.stderr)

    def send(line):
        try:
            while line:
                line = line[write(ctl, line):]
        except OSError:
            pass

    def flush():
        for s in streams + (sys.stdout, sys.stderr):
            try:
                s.flush()
            except BaseException:
                pass

    try:
        nonce = _read_all(cfg["nonce_fd"]).strip()
        os.close(cfg["nonce_fd"])
        if len(nonce) < 32:
            raise RuntimeError("no nonce from the parent")
        ok_line = b"ok " + nonce + b"\n"
        del nonce
        with open(cfg["prog"], "rb") as f:
            source = f.read()
        os.environ.pop("PWD", None)  # bwrap's --chdir sets it; the program gets the parent's four variables
        layers, notes = contain(cfg, source)
        guard = "guard" not in cfg["disable"]
        if guard:
            layers["filesystem"].append("guard")
            layers["process"].append("guard")
            if not cfg["network"]:
                layers["network"].append("guard")
        send(b"report " + dumps({"layers": layers, "notes": notes}).encode() + b"\n")
        if guard:
            _install_guard(cfg["dir"], cfg["network"])
        import builtins, types
    except BaseException as e:
        import traceback
        sys.stderr.write("sandbox setup failed: %r\n" % (e,))
        traceback.print_exc()
        sys.stderr.flush()
        exit_(EXIT_SETUP)

    mod = types.ModuleType("__main__")
    mod.__file__ = cfg["prog"]
    mod.__builtins__ = builtins
    sys.modules["__main__"] = mod
    sys.argv = [cfg["prog"]]
    try:
        code = compile(source, "main.py", "exec")
        exec(code, mod.__dict__)
    except SystemExit as e:
        c = e.code
        rc = 0 if c is None else c if isinstance(c, int) else 1
        if not isinstance(c, int) and c is not None:
            try:
                sys.stderr.write("%s\n" % (c,))
            except BaseException:
                pass
        send(b"failed " + dumps({"exit": rc}).encode() + b"\n")
        flush()
        exit_(rc & 0xFF)
    except MemoryError as e:
        # Free what the program holds before reporting, or printing the traceback fails again.
        import traceback
        traceback.clear_frames(e.__traceback__)
        mod.__dict__.clear()
        code = None
        send(b'failed {"type": "MemoryError"}\n')
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
        flush()
        exit_(EXIT_MEMORY)
    except BaseException as e:
        try:
            info = {"type": type(e).__name__, "message": str(e)[:1000]}
        except BaseException:
            info = {"type": "Exception", "message": ""}
        send(b"failed " + dumps(info).encode() + b"\n")
        try:
            import traceback
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without this script's frame
        except BaseException:
            pass
        flush()
        exit_(1)
    # The program ran to its end: the only way to a pass.
    flush()
    send(ok_line)
    exit_(0)


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
