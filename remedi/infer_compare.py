"""Compare decoding strategies / confidence sources on the same prompts, side by side.

    python remedi/infer_compare.py --model_name GSAI-ML/LLaDA-8B-Base --ups_head ups.pt \\
        --prompt "Give a brief plan for learning calculus." --prompt "Write a Python function ..." \\
        --steps 128 --gen_length 128 --block_length 16 --logits_eos_inf --confidence_eos_eot_inf

    python remedi/infer_compare.py                 # the embedded model's first test problem, every source
    python remedi/infer_compare.py --interactive   # type prompts; every source answers side by side

Sources (``--sources``, comma list) are the sampler's strategies: ups, tps_prob, margin, entropy, random
(RemeDi remasking) and llada_low_confidence, llada_random (LLaDA, no remasking). Default: all of them (ups
only with a UPS). With no prompt on the embedded model it decodes the first test problem, prints the gold
answer and which sources got it right, and saves the lines to runs/infer_compare-<time>.jsonl.
``--interactive`` reads prompts from stdin until an empty line, ``quit`` or end of input. Every bad flag is
reported before the model's weights load; ``--config FILE`` reads flags from a YAML/JSON file.
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
