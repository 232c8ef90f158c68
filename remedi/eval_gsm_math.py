"""Evaluate sampling strategies (sources) on GSM8K, MATH-500, a local jsonl or the arithmetic task.

    python remedi/eval_gsm_math.py --model_name GSAI-ML/LLaDA-8B-Base --ups_head ups.pt \
        --dataset openai/gsm8k --subset main --split test --format gsm8k --max_samples 50 --infer_bs 1 \
        --steps 128 --gen_length 128 --block_length 16 --temperature 0.0 --cfg_scale 0.0 --eos_gating
    accelerate launch remedi/eval_gsm_math.py ...          # items split across GPUs, same results
    python remedi/eval_gsm_math.py --rescore runs/x/results.jsonl   # re-check completions, no model

Every source runs on the same items with the same per-item seeds; results.jsonl gets one line per
finished item (a rerun with the same --output_dir skips finished items), summary.json/summary.md hold
accuracy with 95% Wilson intervals and paired tests between sources. Library: remedi/evaluation/.
"""
if __package__ in (None, ""):  # run as a file: import the package from the repo root, never from remedi/ itself
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702

import sys

from remedi.arguments import ModelArgs, parse_args, run_main
from remedi.decoding.args import SamplingArgs
from remedi.evaluation.runner import EvalArgs, run


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    m, s, e = parse_args([ModelArgs, SamplingArgs, EvalArgs], argv, description=__doc__)
    return run(m, s, e, argv)


if __name__ == "__main__":
    run_main(main)
