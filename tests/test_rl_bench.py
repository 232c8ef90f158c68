"""bench/bench_rl.py --smoke: the GPU benchmark's update runs end to end on a tiny CPU model."""
import json
import runpy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_rl.py"


@pytest.mark.slow
def test_bench_rl_smoke(tmp_path, monkeypatch):
    out = tmp_path / "rl.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--smoke", "--cases", "lora_head,stream,head", "--out", str(out)])
    monkeypatch.syspath_prepend(str(BENCH.parent))
    runpy.run_path(str(BENCH), run_name="__main__")
    rec = json.loads(out.read_text())
    assert rec["smoke"] and [r["case"] for r in rec["rows"]] == ["lora_head", "stream", "head"]
    for r in rec["rows"]:
        assert "error" not in r, r
        assert r["rollouts"] == 4 and r["forwards"] == 1 + 2 * 4 + 1 and r["update_s"] > 0
        assert r["tok_ratio"] == "1.000..1.000" and r["pl_ratio"] == "1.000..1.000"  # float32: ratio 1 at the step


def test_bench_rl_speed_smoke(tmp_path, monkeypatch):
    """--speed: eager and graph decoder side by side at each batch, ratios against the in-run eager row."""
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--speed", "--smoke", "--batches", "2,3", "--out", str(out)])
    monkeypatch.syspath_prepend(str(BENCH.parent))
    runpy.run_path(str(BENCH), run_name="__main__")
    rec = json.loads(out.read_text())
    assert rec["bench"] == "rl_rollouts" and rec["smoke"]
    assert [(r["batch"], r["decoder"]) for r in rec["rows"]] == [(2, "eager"), (2, "graphs"), (3, "eager"), (3, "graphs")]
    for r in rec["rows"]:
        assert r["rollouts_per_s"] > 0 and abs(r["rollout_tok_s"] - r["rollouts_per_s"] * 16) < 1  # gen 16
        assert r["forwards"] == 8  # 2 blocks x 4 steps, no cache in the bidirectional layout
    graphs = [r for r in rec["rows"] if r["decoder"] == "graphs"]
    assert [r["rows_equal_eager"] for r in graphs] == ["2/2", "3/3"]  # float32: the same rollouts
    assert all(r["speedup_vs_eager"] > 0 for r in graphs)


def test_bench_rl_speed_refuses_bad_flags(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--speed", "--smoke", "--decoders", "eager,cuda"])
    monkeypatch.syspath_prepend(str(BENCH.parent))
    with pytest.raises(SystemExit, match="error: --decoders"):
        runpy.run_path(str(BENCH), run_name="__main__")
