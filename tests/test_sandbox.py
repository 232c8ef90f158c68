"""Tests for the sandboxed program runner (remedi/sandbox/).

Every test runs real child processes and checks the effect, not just the reported status: files that must
not appear, a listener that must see no connection, a process group that must be gone. Tests of a single
kernel layer (``disable=("guard",)``) are skipped where the probe says that layer is not available.
"""
from __future__ import annotations

import itertools
import math
import os
import resource
import socket
import sys
import time
import uuid
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remedi import sandbox as ce  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

FAST = ce.Limits(wall_s=5, cpu_s=5, memory_mb=256)


@pytest.fixture(scope="module")
def layers() -> dict:
    return ce.containment()


def _needs(layers: dict, kind: str, *names: str) -> None:
    have = layers.get(kind, [])
    if not any(any(h.startswith(n) for h in have) for n in names):
        pytest.skip(f"no kernel {kind} layer among {names} on this machine: {layers.get('notes')}")


# ---- basic outcomes ----------------------------------------------------------------------------------

def test_passing_program_passes():
    r = ce.run_program("import math\nprint('ok', math.factorial(5))\n", FAST)
    assert (r.status, r.passed, r.returncode) == ("passed", True, 0)
    assert r.stdout == "ok 120\n"
    assert r.duration_s < 5


def test_failing_assert_fails():
    r = ce.run_program("def f(x):\n    return x + 1\nassert f(1) == 3, 'f is wrong'\n", FAST)
    assert (r.status, r.passed, r.returncode) == ("failed", False, 1)
    assert r.reason == "AssertionError: f is wrong"
    assert "Traceback" in r.stderr


def test_exception_syntax_error_and_exit_code_fail():
    assert ce.run_program("undefined_name\n", FAST).reason.startswith("NameError")
    r = ce.run_program("def f(:\n    pass\n", FAST)
    assert r.status == "failed" and r.reason.startswith("SyntaxError")
    r = ce.run_program("import sys\nsys.exit(3)\n", FAST)
    assert (r.status, r.returncode) == ("failed", 3)


def test_program_runs_as_main_in_fresh_temp_dir_which_is_removed():
    src = ("import os, sys\nassert __name__ == '__main__'\nopen('local.txt', 'w').write('hello')\n"
           "assert open('local.txt').read() == 'hello'\nos.mkdir('sub'); os.remove('local.txt')\n"
           "print(os.getcwd())\nprint(sys.flags.isolated, sys.flags.no_site)\n")
    r = ce.run_program(src, FAST)
    assert r.passed, r.stderr
    cwd, flags = r.stdout.splitlines()
    assert flags == "1 1"
    assert Path(cwd).name.startswith("remedi-exec-") and not Path(cwd).exists()


def test_output_is_truncated_to_its_tail():
    r = ce.run_program("for i in range(20000):\n    print('line', i)\nprint('END')\n",
                       ce.Limits(wall_s=5, max_output_bytes=200))
    assert r.passed and r.stdout_truncated
    assert len(r.stdout.encode()) <= 200 and r.stdout.endswith("END\n")


# ---- time, memory --------------------------------------------------------------------------------------

def test_infinite_loop_times_out_and_the_process_group_is_gone():
    src = ("import os, threading\nprint(os.getpid(), flush=True)\n"
           "threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()\n"
           "while True:\n    pass\n")
    t0 = time.monotonic()
    r = ce.run_program(src, ce.Limits(wall_s=1, cpu_s=30))
    elapsed = time.monotonic() - t0
    assert r.status == "timeout" and not r.passed and "wall-clock" in r.reason
    assert 1.0 <= elapsed < 4.0  # the deadline, not the loop, ended it
    assert r.stdout.split()[0].isdigit()  # it did run
    assert _descendants() == []  # nothing of the child (bwrap, the program, its thread) is left


def _descendants(root: int | None = None) -> list[int]:
    """Live (non-zombie) processes below ``root`` (default: this test process)."""
    root = os.getpid() if root is None else root
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parent[int(name)] = int(fields[1])
    out = []
    for pid in parent:
        p = pid
        while p in parent and p > 1:
            p = parent[p]
            if p == root:
                out.append(pid)
                break
    return out


def test_cpu_limit_is_a_timeout():
    t0 = time.monotonic()
    r = ce.run_program("while True:\n    pass\n", ce.Limits(wall_s=10, cpu_s=1))
    assert r.status == "timeout" and "CPU" in r.reason
    assert time.monotonic() - t0 < 8  # well before the 10 s wall limit


@pytest.mark.parametrize("bomb", [
    "x = bytearray(64 * 1024 ** 3)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n",
    "s = 'x'\nwhile True:\n    s = s + s\n",
], ids=["huge_bytearray", "list_growth", "string_doubling"])
def test_memory_bomb_is_memory_and_parent_is_unharmed(bomb):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = ce.run_program(bomb, ce.Limits(wall_s=10, cpu_s=10, memory_mb=256))
    assert r.status == "memory" and not r.passed, (r.status, r.reason, r.stderr[-500:])
    assert r.duration_s < 10
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 64  # the allocation happened in the child only
    assert ce.run_program("print(1)", FAST).passed  # the parent can still run programs


# ---- filesystem ----------------------------------------------------------------------------------------

WRITE_VARIANTS = {
    "open": "open(TARGET, 'w').write('pwned')\n",
    "os.open": "import os\nfd = os.open(TARGET, os.O_WRONLY | os.O_CREAT, 0o644)\nos.write(fd, b'pwned')\n",
    "pathlib": "import pathlib\npathlib.Path(TARGET).write_text('pwned')\n",
    # bypasses the Python guard on purpose: the class of sys.stdout's raw file is the unpatched FileIO
    "raw FileIO": "import sys\ntype(sys.stdout.buffer.raw)(TARGET, 'w').write(b'pwned')\n",
}


@pytest.mark.parametrize("variant", sorted(WRITE_VARIANTS))
def test_write_outside_temp_dir_fails(tmp_path, variant):
    targets = [tmp_path / f"victim-{uuid.uuid4().hex}.txt", Path("/tmp") / f"remedi-victim-{uuid.uuid4().hex}"]
    for target in targets:
        r = ce.run_program(f"TARGET = {str(target)!r}\n" + WRITE_VARIANTS[variant], FAST)
        assert r.status == "failed", (r.status, r.stdout, r.stderr[-300:])
        assert not target.exists()


@pytest.mark.parametrize("variant", sorted(WRITE_VARIANTS))
def test_kernel_layers_alone_stop_writes(tmp_path, layers, variant):
    _needs(layers, "filesystem", "mount-ro", "landlock")
    target = tmp_path / "victim.txt"
    r = ce.run_program(f"TARGET = {str(target)!r}\n" + WRITE_VARIANTS[variant], FAST, disable=("guard",))
    assert r.status == "failed" and any(m in r.reason for m in ("Read-only file system", "Permission denied",
                                                                 "No such file")), r.reason
    assert not target.exists()


def test_existing_file_outside_is_not_modified_or_deleted(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("original")
    src = (f"import os, shutil\nP = {str(victim)!r}\nfails = 0\n"
           "for f in (lambda: os.remove(P), lambda: open(P, 'a').write('x'), lambda: os.truncate(P, 0),\n"
           "          lambda: os.rename(P, P + '.moved'), lambda: shutil.rmtree(os.path.dirname(P)),\n"
           "          lambda: os.chmod(P, 0)):\n"
           "    try:\n        f()\n    except OSError:\n        fails += 1\n"
           "assert fails == 6, fails\n")
    r = ce.run_program(src, FAST)
    assert r.passed, r.stderr[-500:]
    assert victim.read_text() == "original" and (victim.stat().st_mode & 0o777) != 0


# ---- network -------------------------------------------------------------------------------------------

def _listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.3)
    return srv


CONNECT = ("import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=2)\n"
           "s.sendall(b'hello')\nprint('connected')\n")
RAW_CONNECT = ("import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\n"
               "s.connect(('127.0.0.1', PORT))\nprint('connected')\n")


def _no_connection(srv) -> bool:
    try:
        conn, _ = srv.accept()
    except (socket.timeout, TimeoutError):
        return True
    conn.close()
    return False


@pytest.mark.parametrize("src,disable", [(CONNECT, ()), (RAW_CONNECT, ()), (RAW_CONNECT, ("guard",))],
                         ids=["create_connection", "raw_socket", "raw_socket-kernel_only"])
def test_socket_connection_to_local_listener_fails(layers, src, disable):
    if disable:
        _needs(layers, "network", "netns", "landlock", "seccomp")
    srv = _listener()
    try:
        port = srv.getsockname()[1]
        r = ce.run_program(src.replace("PORT", str(port)), FAST, disable=disable)
        assert r.status == "failed" and "connected" not in r.stdout, (r.status, r.stdout)
        assert _no_connection(srv)
    finally:
        srv.close()


def test_network_true_allows_the_same_connection():
    """Positive control: with network=True the identical program reaches the listener."""
    srv = _listener()
    srv.settimeout(5)
    try:
        port = srv.getsockname()[1]
        import threading
        got = []
        t = threading.Thread(target=lambda: got.append(srv.accept()[0].recv(5)))
        t.start()
        r = ce.run_program(CONNECT.replace("PORT", str(port)), ce.Limits(wall_s=5, network=True))
        t.join(6)
        assert r.passed and r.stdout == "connected\n", r.stderr[-300:]
        assert got == [b"hello"]
    finally:
        srv.close()


# ---- processes -----------------------------------------------------------------------------------------

FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"
SUBPROC = "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo spawned'], check=True)\nprint('ran')\n"
RAW_FORK = "import posix\npid = posix.fork()\nif pid == 0:\n    posix._exit(0)\nprint('forked')\n"


@pytest.mark.parametrize("src", [FORK_BOMB, SUBPROC, "import os\nos.system('echo spawned')\n",
                                 "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\n"],
                         ids=["fork_bomb", "subprocess", "os.system", "multiprocessing"])
def test_fork_bomb_and_subprocess_are_refused(src):
    t0 = time.monotonic()
    r = ce.run_program(src, FAST)
    assert r.status == "failed" and "spawned" not in r.stdout and "ran" not in r.stdout, (r.status, r.stdout)
    assert "Permission" in r.reason or "not permitted" in r.reason, r.reason
    assert time.monotonic() - t0 < 4


@pytest.mark.parametrize("src", [FORK_BOMB, RAW_FORK], ids=["fork_bomb", "posix.fork"])
def test_seccomp_alone_refuses_fork_but_threads_work(layers, src):
    _needs(layers, "process", "seccomp")
    r = ce.run_program(src, FAST, disable=("guard",))
    assert r.status == "failed" and "forked" not in r.stdout and "Operation not permitted" in r.reason
    ok = ce.run_program("import threading\nout = []\nt = threading.Thread(target=out.append, args=(7,))\n"
                        "t.start(); t.join()\nassert out == [7]\n", FAST, disable=("guard",))
    assert ok.passed, ok.stderr[-300:]


def test_child_cannot_signal_the_parent():
    r = ce.run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n", FAST)
    assert r.status == "failed"  # and this test process is still alive to check it


# ---- environment ---------------------------------------------------------------------------------------

def test_parent_environment_is_not_visible(monkeypatch, tmp_path):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("REMEDI_TEST_SECRET", secret)
    (tmp_path / "evil_mod.py").write_text("raise SystemExit('imported from PYTHONPATH')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    src = ("import os, sys\nprint(sorted(os.environ))\nassert 'REMEDI_TEST_SECRET' not in os.environ\n"
           "try:\n    import evil_mod\nexcept ImportError:\n    pass\nelse:\n    raise AssertionError('leak')\n"
           "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
           "assert os.environ['PATH'] == '/usr/bin:/bin' and os.environ['LANG'] == 'C.UTF-8'\n")
    r = ce.run_program(src, FAST)
    assert r.passed, r.stderr[-500:]
    assert secret not in r.stdout + r.stderr
    assert r.stdout.strip() == str(["HOME", "LANG", "PATH", "TMPDIR"])


# ---- run_many ------------------------------------------------------------------------------------------

def test_run_many_mixed_results_in_order():
    sources = ["print('first')\n", "while True:\n    pass\n", "x = bytearray(64 * 1024 ** 3)\n",
               "import time\ntime.sleep(0.2)\nprint('last')\n"]
    t0 = time.monotonic()
    res = ce.run_many(sources, ce.Limits(wall_s=1.5, cpu_s=10, memory_mb=256), workers=4)
    assert [r.status for r in res] == ["passed", "timeout", "memory", "passed"]
    assert res[0].stdout == "first\n" and res[3].stdout == "last\n"
    assert time.monotonic() - t0 < 6  # nobody waited for the loop beyond its own deadline
    assert ce.run_many([], FAST) == []


def test_run_many_per_program_limits_and_validation():
    res = ce.run_many(["import time\ntime.sleep(1.2)\n"] * 2, [ce.Limits(wall_s=0.5), ce.Limits(wall_s=5)])
    assert [r.status for r in res] == ["timeout", "passed"]
    with pytest.raises(ValueError, match="one per source"):
        ce.run_many(["pass"] * 2, [FAST])
    with pytest.raises(ValueError, match="workers"):
        ce.run_many(["pass"], FAST, workers=0)


# ---- containment report --------------------------------------------------------------------------------

def test_containment_is_reported(layers):
    r = ce.run_program("pass\n", FAST)
    assert {"network", "filesystem", "process", "limits"} <= set(r.containment)
    assert "guard" in r.containment["filesystem"] and "as" in r.containment["limits"]
    assert layers["level"]["filesystem"] in {"bwrap", "mount-namespace", "landlock", "guard"}
    assert layers["level"]["network"] in {"namespace", "landlock", "seccomp", "guard"}
    assert ce.containment(network=True)["level"]["network"] == "allowed"
    with pytest.raises(ValueError, match="unknown containment layer"):
        ce.run_program("pass", FAST, disable=("firewall",))


# ---- limits validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"wall_s": 0}, "wall_s must be a positive"), ({"cpu_s": -1}, "cpu_s must be a positive"),
    ({"wall_s": float("inf")}, "wall_s must be a positive finite"), ({"memory_mb": 8}, "memory_mb must be >= 32"),
    ({"memory_mb": 256.0}, "memory_mb must be an int"), ({"max_output_bytes": -1}, "max_output_bytes must be >= 0"),
    ({"network": "no"}, "network must be a bool"), ({"wall_s": True}, "wall_s must be a positive"),
])
def test_bad_limits_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ce.Limits(**kwargs)


# ---- pass@k --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c,k,expected", [
    (5, 0, 1, 0.0), (5, 5, 1, 1.0), (10, 3, 1, 0.3), (10, 3, 2, 1 - 21 / 45), (10, 1, 10, 1.0),
    (4, 2, 3, 1.0), (20, 2, 5, 1 - (18 * 17 * 16 * 15 * 14) / (20 * 19 * 18 * 17 * 16)),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert ce.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_enumeration_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert ce.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    exact = 1 - Fraction(math.comb(197, 100), math.comb(200, 100))
    assert ce.pass_at_k(200, 3, 100) == pytest.approx(float(exact), rel=1e-12)
    assert 0.0 < ce.pass_at_k(1000, 1, 1) == pytest.approx(0.001)


@pytest.mark.parametrize("args,match", [((0, 0, 1), "n must be >= 1"), ((3, 4, 1), "c must be in"),
                                        ((3, 1, 0), "k must be in"), ((3, 1, 4), "k must be in"),
                                        ((3.0, 1, 1), "n must be an int")])
def test_pass_at_k_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ce.pass_at_k(*args)


# ---- package boundary ----------------------------------------------------------------------------------

def test_sandbox_and_code_tasks_import_without_torch_or_evaluation():
    import subprocess
    code = ("import sys\nsys.modules['torch'] = None\nimport remedi.sandbox, remedi.tasks.code\n"
            "bad = sorted(m for m, v in sys.modules.items() if v is not None\n"
            "             and m.startswith(('remedi.evaluation', 'remedi.model', 'torch')))\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-800:]
