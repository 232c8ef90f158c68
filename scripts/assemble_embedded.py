"""Assemble checkpoints/remedi-tiny-gsm from the runs of scripts/build_embedded.sh.

The backbone is stored in bf16 (the CPU loader casts it back to float32), which keeps the whole shipped
folder (model + UPS + LoRA + tokenizer + held-out data) well under 20 MB. The default UPS, the residual policy, is
taken from ``<runs>/ups_residual.pt`` when it is there: its CMA-ES search runs on the assembled model, so a rebuild
runs the search afterwards (Remask_SFT_RUN.md, "The residual UPS"), copies ``search/linear/ups_mean.pt`` to
``<runs>/ups_residual.pt`` and assembles again; until then the scripts fall back to ``ups_head.pt``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remedi.files import atomic_path  # noqa: E402
from remedi.model.checkpoint import load_pretrained, save_pretrained  # noqa: E402

# The quick start's main job runs on 2 CPU cores in minutes with the dual cache and EOS gating; the GPU
# results in the README were run with --cache none (exact) and no gating, as their summary files record.
DEFAULTS = {"gen_length": 96, "block_length": 32, "steps": 48, "cache": "dual", "eos_gating": True}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default="runs/embedded")
    ap.add_argument("--data", default="data/arith")
    ap.add_argument("--out", default="checkpoints/remedi-tiny-gsm")
    args = ap.parse_args(argv)
    # resolved: checkpoints/remedi-tiny-gsm is a link to the package copy (remedi/embedded/), which is what to replace
    runs, out = Path(args.runs), Path(args.out).resolve()
    model = load_pretrained(runs / "model", dtype=torch.float32)
    with atomic_path(out, is_dir=True) as tmp:
        save_pretrained(model, tmp / "stage", dtype=torch.bfloat16)
        for f in (tmp / "stage").iterdir():
            shutil.move(str(f), tmp / f.name)
        (tmp / "stage").rmdir()
        for f in (runs / "model").iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
                shutil.copy2(f, tmp / f.name)
        shutil.copy2(runs / "ups_head.pt", tmp / "ups_head.pt")
        # the LoRA run's head, the cards, and the residual policy (the default UPS) when its search has run
        for name in ("ups_head.md", "ups_head_lora.pt", "ups_head_lora.md", "ups_residual.pt", "ups_residual.md"):
            if (runs / name).exists():
                shutil.copy2(runs / name, tmp / name)
        if (runs / "ups_head_lora.pt").exists():
            shutil.copytree(runs / "lora_joint_adapter", tmp / "lora_joint")
        (tmp / "data").mkdir()
        for split in ("validation", "test"):
            shutil.copy2(Path(args.data) / f"{split}.jsonl", tmp / "data" / f"{split}.jsonl")
        (tmp / "defaults.json").write_text(json.dumps(DEFAULTS, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MB)")
    if size > 20 * 2**20:
        raise SystemExit(f"{out} is {size / 2**20:.1f} MB, over the 20 MB budget for the embedded model")


if __name__ == "__main__":
    main()
