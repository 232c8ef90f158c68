"""LoRA on the LLaDA backbone (TPS) plus the UPS, trained jointly or alternately.

    python remedi/train_remask_lora.py --model_name GSAI-ML/LLaDA-8B-Base --dataset simplescaling/s1K-1.1 \
        --seq_len 1024 --batch_size 1 --epochs 1 --grad_accum 2 --lora_r 16 --lora_alpha 32 \
        --lora_dropout 0.05 --lora_target auto --lr_lora 5e-5 --lr_ups 1e-4 --lambda_ups 1.0 \
        --r_incorrect 0.1 --mask_id 126336 --save_lora_dir checkpoints/lora_s1k \
        --save_ups_head checkpoints/ups_head_s1k_lora.pt

joint: one optimiser step on L_TPS + lambda_ups * L_UPS (the head reads a detached hidden state, so the
BCE never reaches the backbone); alternating: --alt_ratio LoRA steps on L_TPS per UPS step on L_UPS.
Adapters are written in peft format (adapter_config.json + adapter_model.safetensors). With no flags at
all it runs a short CPU demo of the embedded model's shipped LoRA-joint recipe (remedi/training/demo.py).
"""
if __package__ in (None, ""):  # run as a file: import the package from the repo root, never from remedi/ itself
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702


from remedi.arguments import run_main
from remedi.training.demo import run_script


def main(argv=None) -> dict:
    return run_script("train_remask_lora", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
