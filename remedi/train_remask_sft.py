"""Remask SFT: train the UPS (head or stream) on a frozen LLaDA backbone, or the whole model.

    python remedi/train_remask_sft.py --model_name GSAI-ML/LLaDA-8B-Base --dataset simplescaling/s1K-1.1 \
        --seq_len 1024 --batch_size 1 --epochs 1 --lr 1e-4 --lambda_ups 1.0 --r_incorrect 0.1 \
        --mask_id 126336 --save_path checkpoints/ups_head_s1k.pt
    accelerate launch --config_file configs/accelerate_ddp.yaml remedi/train_remask_sft.py ...

With no flags at all it runs a one-minute CPU demo of the embedded model's shipped UPS-head recipe
(remedi/training/demo.py) and says where it saved the head. LoRA on the backbone is train_remask_lora.py;
both scripts share remedi.training.loop.run.
"""
if __package__ in (None, ""):  # run as a file: import the package from the repo root, never from remedi/ itself
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702

import dataclasses

from remedi.arguments import ModelArgs, run_main
from remedi.training import demo
from remedi.training.args import DataArgs, LoraArgs, SftArgs, TrainArgs

SCRIPT = "train_remask_sft"

LORA_FLAGS = {f"--{f.name}" for f in dataclasses.fields(LoraArgs)} - {f"--{f.name}" for f in
                                                                      dataclasses.fields(SftArgs)}


def lora_hint(flags: list[str]):
    lora = [f for f in flags if f in LORA_FLAGS]
    if lora:
        return (f"{', '.join(lora)} {'is a LoRA flag' if len(lora) == 1 else 'are LoRA flags'}: this script trains "
                "the UPS (or the full model); use train_remask_lora.py for LoRA training")
    return None


def main(argv=None) -> dict:
    return demo.run_script(SCRIPT, argv, [ModelArgs, DataArgs, TrainArgs, SftArgs], __doc__, unknown_hint=lora_hint)


if __name__ == "__main__":
    run_main(main)
