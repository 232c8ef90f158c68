"""Issue 21, items 1-7: every attack runs for real in the sandbox, and the test checks its effect on the host.

Attacks get around the pure-Python guard on purpose (``sys.modules.pop('resource')`` and the like), as a hostile
program would: what must hold is the kernel side. Where a seccomp rule is the defence, the attack also runs on
the fallback path without bubblewrap (``disable=("bwrap",)``) to show that layer on its own.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remedi import sandbox as sb  # noqa: E402
from remedi.sandbox import runner as sbr  # noqa: E402
from remedi.tasks import code as ct  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

FAST = sb.Limits(wall_s=8, cpu_s=5, memory_mb=256)
UNGUARD = "import sys\nfor _m in ('ctypes', '_ctypes', 'resource'):\n    sys.modules.pop(_m, None)\n"
PATHS = [(), ("bwrap",)]  # the default path, and the fallback without bubblewrap (seccomp etc. on their own)
PATH_IDS = ["default", "no-bwrap"]


@pytest.fixture(scope="module")
def layers() -> dict:
    return sb.containment()


@pytest.fixture
def victim():
    """An unrelated process of the same user, for attacks aimed at 'another process'."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def test_default_path_has_every_required_layer(layers):
    """The host CI runs on gives the full sandbox; otherwise every test below would prove less than it says."""
    assert layers["missing"] == [], layers
    assert layers["level"] == {"filesystem": "bwrap", "network": "namespace"}


# ---- 1. other processes' limits (prlimit64), no PID namespace ------------------------------------------------

@pytest.mark.parametrize("disable", PATHS, ids=PATH_IDS)
def test_sample_cannot_change_the_limits_of_its_parent_or_another_process(victim, disable):
    before_victim = resource.prlimit(victim.pid, resource.RLIMIT_CPU)
    before_self = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    src = UNGUARD + (
        "import resource, os\nhits = []\n"
        f"for pid, res, lim in (({victim.pid}, resource.RLIMIT_CPU, (1, 1)),\n"
        f"                      ({os.getpid()}, resource.RLIMIT_MSGQUEUE, (4096, 4096)),\n"
        "                      (os.getppid(), resource.RLIMIT_CPU, (1, 1))):\n"
        "    try:\n        resource.prlimit(pid, res, lim)\n        hits.append(pid)\n"
        "    except OSError as e:\n        print(pid, type(e).__name__)\n"
        "assert not hits, hits\n")
    r = sb.run_program(src, FAST, disable=disable)
    assert r.passed, (r.reason, r.stdout, r.stderr[-400:])
    assert resource.prlimit(victim.pid, resource.RLIMIT_CPU) == before_victim
    assert resource.getrlimit(resource.RLIMIT_MSGQUEUE) == before_self
    assert victim.poll() is None


@pytest.mark.slow
def test_sample_sees_no_other_process_and_cannot_starve_a_sibling():
    """The measured attack: find the neighbour through /proc and set its RLIMIT_CPU to 1 s."""
    attacker = UNGUARD + (
        "import os, resource, time\nfound = set()\nt = time.time()\n"
        "while time.time() - t < 3:\n"
        "    for name in os.listdir('/proc'):\n"
        "        if name.isdigit() and int(name) not in (os.getpid(), 1):\n"
        "            found.add(int(name))\n"
        "            try:\n                resource.prlimit(int(name), resource.RLIMIT_CPU, (1, 1))\n"
        "            except OSError:\n                pass\n"
        "    time.sleep(0.05)\nprint(sorted(found))\n")
    honest = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.6:\n    pass\nprint('done')\n"
    res = sb.run_many([attacker, honest], sb.Limits(wall_s=15, cpu_s=5, memory_mb=256), workers=2)
    assert res[1].passed and res[1].stdout == "done\n", (res[1].status, res[1].reason)
    assert res[0].passed and res[0].stdout == "[]\n", res[0].stdout  # not even bwrap's init is another pid here


# ---- 2. wrong code scored as passed ---------------------------------------------------------------------------

ROW = {"task_id": "Toy/0", "entry_point": "add", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
FULL = "def add(a, b):\n    return a - b\n"  # wrong; each trick below tries to make it score anyway
TRICKS = {
    "sys.exit(0)": FULL + "import sys\nsys.exit(0)\n",
    "os._exit(0)": FULL + "import os\nos._exit(0)\n",
    "replaced os._exit": FULL + "import os\n_real = os._exit\nos._exit = lambda code: _real(0)\n",
    "replaced print_exception": FULL + "import traceback, os\n"
                                       "traceback.print_exception = lambda *a, **k: os._exit(0)\n",
    "atexit + excepthook": FULL + "import sys, os, atexit\nsys.excepthook = lambda *a: os._exit(0)\n"
                                  "atexit.register(lambda: os._exit(0))\n",
    "forged marker": FULL + "import os\nfor fd in range(3, 64):\n    try:\n"
                            "        os.write(fd, b'ok ' + b'0' * 48 + b'\\n')\n    except OSError:\n        pass\n",
}


@pytest.mark.parametrize("name", sorted(TRICKS))
def test_exit_tricks_do_not_pass_wrong_code(name):
    [res] = ct.score_completions([ROW], [TRICKS[name]], "humaneval", limits=FAST)
    assert (res["passed"], res["status"]) == (False, "failed"), res


def test_pass_at_1_of_one_correct_and_three_tricks_is_a_quarter():
    comps = ["    return a + b\n", TRICKS["sys.exit(0)"], TRICKS["os._exit(0)"], TRICKS["replaced print_exception"]]
    res = ct.score_completions([ROW], [comps], "humaneval", limits=FAST)
    assert [r["passed"] for r in res] == [True, False, False, False]
    assert sb.pass_at_k(4, sum(r["passed"] for r in res), 1) == 0.25


def test_program_that_runs_to_its_end_passes_even_with_exit_hooks_installed():
    src = "import atexit, sys\natexit.register(print, 'bye')\nsys.excepthook = None\nprint('end')\n"
    r = sb.run_program(src, FAST)
    assert r.passed and r.stdout == "end\n", (r.reason, r.stderr[-300:])


# ---- 3. memory outside RLIMIT_AS ------------------------------------------------------------------------------

# 24 memfds of 8 MiB (each under RLIMIT_FSIZE): 192 MiB held by a sample limited to 128 MiB before the fix
MEMFD = ("import os\nfds = []\nfor _ in range(24):\n    fd = os.memfd_create('hold')\n"
         "    os.write(fd, b'x' * (8 << 20))\n    fds.append(fd)\n"
         "print('held', sum(os.fstat(f).st_size for f in fds) >> 20, 'MiB')\n")


@pytest.mark.parametrize("disable", PATHS, ids=PATH_IDS)
def test_memfd_cannot_hold_memory_outside_the_limit(disable):
    r = sb.run_program(MEMFD, sb.Limits(wall_s=8, cpu_s=5, memory_mb=128), disable=disable)
    assert r.status == "failed" and "held" not in r.stdout, (r.status, r.stdout)
    assert r.reason.startswith("PermissionError") and "not permitted" in r.reason, r.reason


def test_shm_and_root_are_not_writable_memory():
    src = "import os\nfails = 0\nfor p in ('/dev/shm/x', '/x', '/tmp/x', '/dev/x'):\n    try:\n" \
          "        open(p, 'wb').write(b'x' * 4096)\n    except OSError:\n        fails += 1\nassert fails == 4, fails\n"
    r = sb.run_program(src, FAST, disable=("guard",))
    assert r.passed, (r.reason, r.stderr[-300:])


# ---- 4. SIGIO aimed at another process ------------------------------------------------------------------------

ASYNC_KILL = ("import os, fcntl, signal\nr, w = os.pipe()\nerrs = []\n"
              "for call in (lambda: fcntl.fcntl(r, fcntl.F_SETOWN, VICTIM),\n"
              "             lambda: fcntl.fcntl(r, 10, signal.SIGKILL),\n"
              "             lambda: fcntl.ioctl(r, 0x8901, (VICTIM).to_bytes(4, 'little'))):\n"
              "    try:\n        call()\n    except OSError as e:\n        errs.append(e.errno)\n"
              "fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)\n"
              "os.write(w, b'x')\nprint(errs)\n")


@pytest.mark.parametrize("disable", PATHS + [("bwrap", "landlock")], ids=PATH_IDS + ["seccomp-only"])
def test_fcntl_setown_setsig_cannot_kill_another_process(victim, disable):
    """Landlock ABI >= 6 (kernel 6.12+) scopes signals too; "seccomp-only" is the LTS-kernel case."""
    r = sb.run_program(ASYNC_KILL.replace("VICTIM", str(victim.pid)), FAST, disable=disable)
    time.sleep(0.2)
    assert victim.poll() is None, "the victim was killed"
    assert r.passed and json.loads(r.stdout) == [1, 1, 1], (r.stdout, r.reason)  # EPERM from seccomp, each


# ---- 5. reads confined; reason sanitised ----------------------------------------------------------------------

@pytest.fixture
def secret_file(tmp_path) -> tuple[Path, str]:
    """A 0600 file of the evaluator's user outside the sandbox, and its (random) content."""
    secret = uuid.uuid4().hex
    s = tmp_path / "secret.txt"
    s.write_text(secret)
    s.chmod(0o600)
    return s, secret


def test_files_outside_are_not_readable(secret_file):
    s, secret = secret_file
    data = ROOT.parent / "shared" / "data"
    targets = [str(s), str(ROOT / "README.md"), str(ROOT / "remedi" / "sandbox" / "runner.py"), "/etc/passwd",
               f"/proc/{os.getpid()}/cmdline", f"/proc/{os.getppid()}/environ", str(Path.home() / ".bashrc"),
               str(Path(sys.executable).resolve().parents[1] / "lib" / f"python{sys.version_info[0]}."
                   f"{sys.version_info[1]}" / "site-packages")]
    if data.is_dir():
        targets += [str(p) for p in sorted(data.rglob("*.jsonl"))[:2]]
    src = ("import os\nleaks = []\n"
           f"for p in {targets!r}:\n"
           "    try:\n        leaks.append((p, os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read(64)))\n"
           "    except OSError:\n        pass\n"
           "leaks = [x for x in leaks if x[1]]\nassert not leaks, leaks\n"
           "print(sorted(os.listdir('/tmp')) == [os.path.basename(os.getcwd())])\n")
    r = sb.run_program(src, FAST, disable=("guard",))
    assert r.passed and r.stdout == "True\n", (r.reason, r.stdout, r.stderr[-500:])  # no other sample's dir either
    assert secret not in r.stdout + r.stderr


def test_reason_carries_no_file_contents_or_outside_paths(secret_file):
    s, secret = secret_file
    # on the default path the file does not exist inside; the path in the error is redacted
    r = sb.run_program(f"open({str(s)!r}).read()\n", FAST)
    assert r.reason.startswith("FileNotFoundError") and str(s.parent) not in r.reason and "<path>" in r.reason
    # a program printing what it likes as its last stderr line does not choose the reason
    src = f"import sys, os\nsys.stderr.write('AssertionError: {secret}\\n')\nsys.stderr.flush()\nos._exit(1)\n"
    r = sb.run_program(src, FAST)
    assert r.status == "failed" and secret not in r.reason and secret in r.stderr, r.reason
    # an exception message is cut short and stays on one line
    r = sb.run_program("raise ValueError('x' * 5000 + '\\nsecond line /etc/shadow')\n", FAST)
    assert r.reason.startswith("ValueError: xxx") and len(r.reason) <= 140 and "\n" not in r.reason


# ---- 6. total disk cap; no temp folders left by a killed evaluator ---------------------------------------------

@pytest.mark.parametrize("disable", PATHS, ids=PATH_IDS)
def test_total_disk_use_is_capped(disable):
    src = ("import os\nwritten = 0\ntry:\n    for i in range(64):\n        with open(f'f{i}', 'wb') as f:\n"
           "            for _ in range(4):\n                f.write(b'x' * (1 << 20))\n                f.flush()\n"
           "                written += 1 << 20\nexcept OSError as e:\n    print(written >> 20, e.errno)\n")
    r = sb.run_program(src, sb.Limits(wall_s=10, cpu_s=5, memory_mb=256, file_size_mb=4, disk_mb=8),
                       disable=disable)
    assert r.passed, (r.reason, r.stderr[-300:])
    mib, errno = map(int, r.stdout.split())
    assert mib <= 8 and errno == 28  # ENOSPC at the 8 MiB cap, not 256 MiB later


def test_stale_temp_dirs_of_dead_evaluators_are_removed(tmp_path, victim):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"remedi-exec-{dead}-abc"
    live = tmp_path / f"remedi-exec-{victim.pid}-abc"
    other = tmp_path / "remedi-exec-xyz"
    for d in (stale, live, other):
        (d / "sub").mkdir(parents=True)
    assert sb.clean_stale_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


@pytest.mark.parametrize("disable", PATHS, ids=PATH_IDS)
def test_killed_evaluator_leaves_no_sample_running(tmp_path, disable):
    code = ("import sys; sys.path.insert(0, %r)\nfrom remedi import sandbox as sb\n"
            "sb.run_program('import time\\nprint(1, flush=True)\\ntime.sleep(30)\\n', sb.Limits(wall_s=40, cpu_s=40),"
            " disable=%r)\n" % (str(ROOT), disable))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    ev = subprocess.Popen([sys.executable, "-c", code], env=env)
    tag = f"remedi-exec-{ev.pid}-"
    deadline = time.time() + 20
    while time.time() < deadline and not _with_tag(tag):
        time.sleep(0.1)
    assert _with_tag(tag), "the sample never started"
    time.sleep(0.5)
    ev.send_signal(signal.SIGKILL)
    ev.wait()
    deadline = time.time() + 5
    while time.time() < deadline and _with_tag(tag):
        time.sleep(0.1)
    assert _with_tag(tag) == []
    left = sorted(p.name for p in tmp_path.iterdir())
    if disable:  # the fallback's host folder outlives a SIGKILL; the next evaluator removes it
        assert len(left) == 1 and left[0].startswith(tag)
        sb.clean_stale_dirs(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _with_tag(tag: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if tag.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    out.append(int(name))
            except OSError:
                pass
    return out


# ---- 7. a weak host refuses to score --------------------------------------------------------------------------

def test_weak_host_refuses_to_score_with_one_line_naming_layer_and_flag(monkeypatch):
    monkeypatch.setenv("REMEDI_BWRAP", "none")  # as on a host without bubblewrap
    missing = sb.missing_layers()
    assert {"pidns", "read-confined"} <= set(missing)
    with pytest.raises(sb.SandboxError) as err:
        ct.score_completions([ROW], ["    return a + b\n"], "humaneval", limits=FAST)
    msg = str(err.value)
    assert "\n" not in msg and "pidns" in msg and "--allow_weak_sandbox" in msg and "bubblewrap" in msg
    try:
        sb.accept_weak_host()
        [res] = ct.score_completions([ROW], ["    return a + b\n"], "humaneval", limits=FAST)
        assert res["passed"]
    finally:
        sb.accept_weak_host(False)


def test_seccomp_missing_is_named(monkeypatch):
    info = {"process": ["pidns", "no-capabilities"], "filesystem": ["read-confined", "disk-cap"],
            "network": ["netns"], "limits": ["as", "cpu", "fsize"], "notes": ["seccomp: no filter for aarch64"]}
    monkeypatch.setattr(sbr, "_probe", lambda network, bwrap: dict(info))
    with pytest.raises(sb.SandboxError, match=r"lacks seccomp \(seccomp-BPF on x86-64\) \[seccomp: no filter"):
        sb.require_strong()
