"""Compare decoding strategies / confidence sources on the same prompts, side by side.

    python remedi/infer_compare.py --model_name GSAI-ML/LLaDA-8B-Base --ups_head ups.pt \\
        --prompt "Give a brief plan for learning calculus." --prompt "Write a Python function ..." \\
        --steps 128 --gen_length 128 --block_length 16 --logits_eos_inf --confidence_eos_eot_inf

Sources (``--sources``, comma list) are the sampler's strategies: ups, tps_prob, margin, entropy, random
(RemeDi remasking) and llada_low_confidence, llada_random (LLaDA, no remasking). Default: ups,tps_prob,random
with a UPS, else the training-free ones. Every bad flag is reported before the model's weights load.
"""
if __package__ in (None, ""):  # run as a file: import the package from the repo root, never from remedi/ itself
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702

from remedi.arguments import ModelArgs, parse_args, run_main, setup_logging
from remedi.decoding.args import SamplingArgs
from remedi.evaluation.compare import CompareArgs, run_compare


def main(argv=None) -> list[dict]:
    m, s, c = parse_args([ModelArgs, SamplingArgs, CompareArgs], argv, description=__doc__)
    setup_logging()
    return run_compare(m, s, c)


if __name__ == "__main__":
    run_main(main)
