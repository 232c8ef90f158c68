"""scripts/residual_experiment.py: the mechanism counters, the slip detector, and a tiny eval run on CPU."""
import json
import sys
from pathlib import Path

import pytest

from remedi.policy.slip import equation_is_true, false_result_positions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import residual_experiment as X  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slip_detector_flags_only_false_results():
    pieces = ["3", " +", " ", "4", "5", " =", " ", "4", "9", ".", " ", "2", " *", " ", "3", " =", " ", "6"]
    assert false_result_positions(pieces) == [7, 8]  # 3 + 45 = 49 is false, 2 * 3 = 6 is true
    assert equation_is_true("12", "/", "4", "3") and not equation_is_true("7", "/", "2", "3")


def test_recommit_share_counts_same_and_changed_tokens():
    traj = [{"remasked": [], "unmasked": [0, 1], "tokens": [5, 6, None]},
            {"remasked": [0, 1], "unmasked": [2], "tokens": [None, None, 7]},
            {"remasked": [], "unmasked": [0, 1], "tokens": [5, 9, 7]}]
    assert X.recommit_share(traj) == (2, 1)


def test_tiny_eval_writes_results_summary_and_mechanism(tmp_path, capsys):
    out = tmp_path / "rx"
    s = X.main(["--out", str(out), "--phase", "eval", "--n_items", "2", "--steps_list", "6", "--device", "cpu",
                "--mechanism_items", "1"])
    names = {r["policy"] for r in s["rows"]}
    assert {"entropy", "tps_prob", "margin", "entropy_unmask_only", "mix_0.2_untrained", "slip_oracle"} <= names
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * len(names)
    assert all(r["remasks"] == 0 for r in recs if r["source"] == "entropy_unmask_only")
    assert json.loads((out / "summary.json").read_text())["rows"] == s["rows"]
    assert "McNemar p" in capsys.readouterr().out
    again = X.main(["--out", str(out), "--phase", "eval", "--n_items", "2", "--steps_list", "6", "--device", "cpu",
                    "--mechanism_items", "1"])  # resumes: nothing new decoded
    assert len((out / "results.jsonl").read_text().splitlines()) == len(recs) and again["rows"] == s["rows"]
