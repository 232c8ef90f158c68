"""The Remask RL trainer tests' rows, UPS files, command lines and launchers (test_rl_trainer*.py)."""
import json
from pathlib import Path

import pytest
import torch

from remedi.arguments import ModelArgs
from remedi.model.checkpoint import add_stream, load_pretrained, read_ups, save_ups
from remedi.model.llada import UPSHead, init_weights
from remedi.rl import trainer as T
from remedi.rl.args import RLArgs
from remedi.train_remask_rl import main


ROWS = [{"id": f"p{i}", "question": f"Tom has {i} apples and buys {i % 7 + 2} more. How many?",
         "answer": f"{i} + {i % 7 + 2} = {i + i % 7 + 2}. #### {i + i % 7 + 2}"} for i in range(24)]


@pytest.fixture(scope="module")
def ups(tiny_model_dir, tmp_path_factory):
    """A head checkpoint (MLP width 32) and a stream checkpoint (taps 0, 2) for the tiny model."""
    d = tmp_path_factory.mktemp("rl_ups")
    lm = load_pretrained(tiny_model_dir, dtype=torch.float32)
    head = UPSHead(lm.config.d_model, 32)
    init_weights(head, std=0.2, generator=torch.Generator().manual_seed(1))
    lm.attach_head(head)
    save_ups(d / "head.pt", lm)
    lm = load_pretrained(tiny_model_dir, dtype=torch.float32)
    add_stream(lm, (0, 2))
    with torch.no_grad():
        for lin in lm.model.backprop_linears:  # live bridges: the stream also moves the token policy
            lin.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    save_ups(d / "stream.pt", lm)
    return {"head": d / "head.pt", "stream": d / "stream.pt"}


def argv(model_dir, data, ups_path, out, *extra):
    return ["--model_name", str(model_dir), "--ups_head", str(ups_path), "--dataset", str(data), "--device", "cpu",
            "--output_dir", str(out), "--gen_length", "16", "--block_length", "8", "--steps", "8",
            "--group_size", "4", "--prompts_per_update", "2", "--max_updates", "2", "--lr", "1e-2",
            "--warmup_steps", "0", "--reward", "toy_even_tokens", *extra]


def make_trainer(args):
    from remedi.arguments import parse_args

    margs, rargs = parse_args([ModelArgs, RLArgs], args)
    tr = T.RLTrainer(margs, rargs)
    tr.setup()
    return tr


def _ups_tensors(path):
    state, _ = read_ups(path)
    return state


def _learn(model_dir, data, ups_path, out, reward, *extra):
    r = main(argv(model_dir, data, ups_path, out, "--reward", reward, "--max_updates", "14", "--group_size", "8",
                  "--lr", "5e-2", "--temperature", "1.0", "--ups_temperature", "1.0", *extra))
    return [json.loads(x) for x in (Path(r["output_dir"]) / "metrics.jsonl").read_text().splitlines()]


def _first_last(xs, n=3):
    return sum(xs[:n]) / n, sum(xs[-n:]) / n


def run_two_processes(args, timeout: float = 300) -> None:
    """train_remask_rl.py ``args`` on two CPU processes (gloo DDP through accelerate, launched with torchrun)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port: other test runs may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "remedi/train_remask_rl.py", *args]
    try:
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
    except subprocess.TimeoutExpired as e:  # say where it stood, not only that it timed out
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"two-process run still going after {timeout} s; its stderr ends:\n{err[-3000:]}") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
