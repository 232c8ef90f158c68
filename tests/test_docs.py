"""Every command the docs show parses with the flags the scripts really have, and the documented CPU smoke
build of the embedded model runs (twice: a rerun continues instead of refusing its folders)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "Local_RUN.md", "Remask_SFT_RUN.md"]


def _parsers():
    from remedi.arguments import ModelArgs
    from remedi.decoding.args import SamplingArgs
    from remedi.evaluation.compare import CompareArgs
    from remedi.evaluation.runner import EvalArgs
    from remedi.rl.args import RLArgs
    from remedi.training.args import DataArgs, LoraArgs, SftArgs, TrainArgs

    return {"remedi/train_remask_sft.py": [ModelArgs, DataArgs, TrainArgs, SftArgs],
            "remedi/train_remask_lora.py": [ModelArgs, DataArgs, TrainArgs, LoraArgs],
            "remedi/train_remask_rl.py": [ModelArgs, RLArgs],
            "remedi/infer_compare.py": [ModelArgs, SamplingArgs, CompareArgs],
            "remedi/eval_gsm_math.py": [ModelArgs, SamplingArgs, EvalArgs]}


def doc_commands():
    """(doc, script, argv) for every complete command line in the docs' bash blocks."""
    out = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split(" # ")[0].strip()
                m = re.search(r"(remedi/\w+\.py)(.*)$", line)
                if not m or "..." in line or "$" in m.group(2):
                    continue
                out.append((doc, m.group(1), shlex.split(m.group(2))))
    return out


@pytest.mark.parametrize("doc, script, argv", doc_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_parses(doc, script, argv, monkeypatch):
    from remedi.arguments import parse_args

    monkeypatch.chdir(REPO)  # --config paths in the docs are relative to the checkout

    parsers = _parsers()
    assert script in parsers, f"{doc} runs {script}, which is not one of the scripts"
    parse_args(parsers[script], [a for a in argv if a != "--debug"])


def test_docs_show_every_script():
    assert {s for _, s, _ in doc_commands()} == set(_parsers())


@pytest.mark.slow
def test_documented_smoke_build_runs_and_reruns(tmp_path):
    env = {**os.environ, "N_TRAIN": "2000", "PRE_STEPS": "3", "PRE2_STEPS": "3", "UPS_STEPS": "3", "LORA_STEPS": "3",
           "BS": "8", "RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data"), "MODEL_OUT": str(tmp_path / "emb"),
           "PY": sys.executable}
    for attempt in (1, 2):
        p = subprocess.run(["bash", "scripts/build_embedded.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"attempt {attempt}: {p.stderr[-3000:]}"
    assert (tmp_path / "emb" / "config.json").is_file() and (tmp_path / "emb" / "ups_head.pt").is_file()
