"""What a user sees for bad input from a shell: one line naming the problem, exit code 2, no traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("args, says", [
    (["remedi/infer_compare.py", "--model_name", "/nonexistent/model", "--prompt", "x"], "/nonexistent/model"),
    (["remedi/eval_gsm_math.py", "--sources", "best"], "--sources: unknown ['best']"),
    (["remedi/train_remask_sft.py", "--lora_r", "4"], "--lora_r belongs to train_remask_lora.py"),
    (["remedi/train_remask_lora.py", "--save_path", "x.pt"], "--save_path belongs to train_remask_sft.py"),
    (["remedi/train_remask_sft.py", "--max_steps", "1", "--save_path", "/"], "--save_path / is a folder"),
    # SFT's --lr used to be an ambiguous prefix of --lr_lora/--lr_ups here (a whole usage text, no hint)
    (["remedi/train_remask_lora.py", "--lr", "1e-4"], "--lr belongs to train_remask_sft.py; here use --lr_lora/--lr_ups"),
    (["remedi/eval_gsm_math.py", "--lora_pth", "x"], "--lora_pth: did you mean --lora_path?"),
    (["remedi/eval_gsm_math.py", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["remedi/train_remask_rl.py", "--group", "4"], "--group: did you mean --group_size?"),
])
@pytest.mark.slow
def test_user_errors_are_one_line_and_exit_2(args, says):
    p = run(*args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], p.stderr[-2000:]
    assert p.stderr.splitlines()[-1] == errors[0]  # the error is the last line: no second hint line after it


@pytest.mark.parametrize("script, says", [
    ("remedi/eval_gsm_math.py", "unknown key 'stepz' (no flag --stepz in this script); did you mean --steps?"),
    ("remedi/train_remask_rl.py", "unknown key 'stepz'"),
])
def test_a_bad_config_file_is_one_line_before_any_work(tmp_path, script, says):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("stepz: 3\n")
    p = run(script, "--config", str(cfg))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr[-2000:]
    assert p.stderr.startswith("error: --config") and says in p.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback():
    p = run("remedi/infer_compare.py", "--model_name", "/nonexistent/model", "--prompt", "x", "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr and "/nonexistent/model" in p.stderr
