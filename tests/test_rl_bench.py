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
