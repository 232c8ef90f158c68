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

from remedi.arguments import run_main
from remedi.training.demo import run_script


def main(argv=None) -> dict:
    return run_script("train_remask_sft", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
