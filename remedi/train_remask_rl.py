r"""Remask RL: GRPO on the joint token / Plackett-Luce position policy, from a Remask-SFT UPS.

    python remedi/train_remask_rl.py                    # the embedded model, ~1 minute on a CPU
    python remedi/train_remask_rl.py --model_name maple-research-lab/RemeDi-Instruct \
        --dataset openai/gsm8k --group_size 16 --prompts_per_update 16 --gen_length 256 --block_length 32 \
        --steps 128 --temperature 1.2 --ups_temperature 1.2 --clip 0.2 --lr 3e-6 --max_updates 100 \
        --save_every 10 --output_dir runs/rl_gsm8k --save_ups_head checkpoints/ups_rl.pt
    accelerate launch --config_file configs/accelerate_ddp.yaml remedi/train_remask_rl.py ...
    python remedi/train_remask_rl.py --rollout_tokens greedy --ups_temperature 0.05 --advantage loo \
        --reward math_verify+equation_truth --credit block --probe_temperatures 0.05,0.1,0.3   # the evaluated decision

``--train ups`` trains the UPS (head or stream) on the frozen backbone; ``--train ups_lora`` adds LoRA
adapters (new, or continued from --lora_path). ``--layout block_causal`` (default) decodes as the authors'
block-diffusion models were trained (the official RemeDi checkpoints); a UPS from this project's
train_remask_sft.py / train_remask_lora.py was trained on whole sequences: use ``--layout bidirectional``
(the embedded model's default). The loop is remedi.rl.trainer.run.
"""
if __package__ in (None, ""):  # run as a file: import the package from the repo root, never from remedi/ itself
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702

from remedi.arguments import ModelArgs, parse_args, run_main
from remedi.rl.args import RLArgs
from remedi.rl.trainer import run


def main(argv=None) -> dict:
    import logging
    import sys

    from remedi.arguments import setup_logging
    from remedi.training.demo import RL_DEMO, rl_summary

    argv = list(sys.argv[1:] if argv is None else argv)
    log = logging.getLogger("train_remask_rl")
    if not argv:
        setup_logging()
        log.info(RL_DEMO)
    margs, rargs = parse_args([ModelArgs, RLArgs], argv, description=__doc__)
    result = run(margs, rargs)
    if not argv:
        log.info(rl_summary(result))
    return result


if __name__ == "__main__":
    run_main(main)
