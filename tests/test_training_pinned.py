"""Pinned losses: four optimiser steps on the tiny fixed model (CPU, float32, fixed seed), head-only SFT and
LoRA joint. The expected numbers were computed once with the training code before the trainer was split into
build/state/step/loop modules; any change in noise, data order, losses, initialisation or optimiser shows here.
"""
import json

import pytest
import torch

from remedi.train_remask_lora import main as lora_main
from remedi.train_remask_sft import main as sft_main

pytestmark = pytest.mark.usefixtures("one_thread", "clean_accelerate")

ROWS = [{"question": f"Sam has {i} pens and gets {i % 5 + 3} more. How many pens?",
         "answer": f"{i} + {i % 5 + 3} = {2 * i % 5 + i + 3}. #### {i + i % 5 + 3}"} for i in range(16)]

# (tps_loss, ups_loss, loss) per optimiser step
PINNED = {
    "head": [(10.9011182785, 0.6927372813, 0.6927372813), (1.8555694818, 0.6875261664, 0.6875261664),
             (4.6940479279, 0.6675448418, 0.6675448418), (5.016017437, 0.652469933, 0.652469933)],
    "lora": [(10.9011182785, 0.6619625688, 11.5630807877), (1.5084049702, 0.638915658, 2.1473207474),
             (3.9514734745, 0.5523447394, 4.5038180351), (2.9762659073, 0.4917945862, 3.4680604935)],
}
EXTRA = {
    "head": ["--ups_width", "16", "--lr", "1e-2", "--warmup_steps", "1"],
    "lora": ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0", "--lr_lora", "1e-2", "--lr_ups", "1e-2",
             "--warmup_steps", "1"],
}


@pytest.mark.parametrize("case", ["head", "lora"])
def test_pinned_losses(tiny_model_dir, tmp_path, case):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / case
    argv = ["--model_name", str(tiny_model_dir), "--dataset", str(data), "--prompt_field", "question",
            "--answer_field", "answer", "--seq_len", "48", "--batch_size", "4", "--log_every", "1",
            "--output_dir", str(out), "--device", "cpu", "--max_steps", "4", "--seed", "3", *EXTRA[case]]
    (sft_main if case == "head" else lora_main)(argv)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = torch.tensor([(x["tps_loss"], x["ups_loss"], x["loss"]) for x in lines], dtype=torch.float64)
    want = torch.tensor(PINNED[case], dtype=torch.float64)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
