"""Shared fixtures: tiny models and tokenizers in the real hub formats, built on the fly (CPU, float32)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from remedi.model.checkpoint import save_pretrained
from remedi.model.config import get_config
from remedi.model.llada import RemeDiLM, init_weights

SPECIALS = ["<|mdm_mask|>", "<|endoftext|>", "<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ '<|startoftext|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CORPUS = [
    "Janet has 3 apples and buys 4 more. How many apples does she have? 3 + 4 = 7. #### 7",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. 2 / 2 = 1. 2 + 1 = 3. #### 3",
    "Give a brief plan for learning calculus. Write a Python function to reverse a string.",
    "The answer is 12 because 5 + 7 = 12 and 3 * 4 = 12. #### 12",
] * 4


def shared_data_dir() -> Path | None:
    """../shared/data beside the checkout (CI copies it there); REMEDI_SHARED_DATA overrides."""
    env = os.environ.get("REMEDI_SHARED_DATA")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.is_dir() else None


def make_tokenizer(vocab_size: int = 120):
    """A small byte-level BPE tokenizer with LLaDA's special tokens at ids 0..5, in the HF fast format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="<|mdm_mask|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|startoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config_for(tokenizer, **overrides):
    n = len(tokenizer)
    return get_config("test-tiny", vocab_size=n, embedding_size=n, mask_token_id=tokenizer.mask_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)


def build_model_dir(path: Path, seed: int = 0, **overrides) -> Path:
    tok = make_tokenizer()
    cfg = tiny_config_for(tok, **overrides)
    model = RemeDiLM(cfg)
    init_weights(model, std=0.2, generator=torch.Generator().manual_seed(seed))
    save_pretrained(model, path)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A hub-layout tiny LLaDA folder (config.json, model.safetensors, tokenizer files)."""
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llada")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: many tiny ops, where thread hand-offs cost more than they
    give (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    """The decoding tests' tiny model with a UPS head (``tests/test_sampler.py:_model``), one per module; a
    module that needs another model defines its own ``model``."""
    from tests.helpers.sampler import _model

    return _model()


@pytest.fixture(scope="module")
def embedded():
    """The embedded model with its round-1 UPS head (``ups_head.pt``), loaded once per module, on the CPU."""
    from remedi.model.loading import EMBEDDED_MODEL, load_for_inference

    return load_for_inference(str(EMBEDDED_MODEL), ups_head=str(EMBEDDED_MODEL / "ups_head.pt"), device="cpu")


@pytest.fixture(scope="module")
def prompts(embedded):
    """The first four questions of the embedded model's test split, tokenized."""
    from remedi.model.loading import EMBEDDED_MODEL

    rows = [json.loads(line) for line in (EMBEDDED_MODEL / "data" / "test.jsonl").read_text().splitlines()[:4]]
    return [embedded.tokenizer(r["question"])["input_ids"] for r in rows]


@pytest.fixture(scope="module")
def stream_model():
    """The same tiny model with a stream UPS instead of the head (``tests/test_sampler.py:_stream_model``)."""
    from tests.helpers.sampler import _stream_model

    return _stream_model()


@pytest.fixture(scope="module")
def data(request, tmp_path_factory) -> Path:
    """The test module's ``ROWS`` (question/answer records) as a jsonl file, written once per module."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "gsm_like.jsonl", request.module.ROWS)


@pytest.fixture
def clean_accelerate():
    """Reset accelerate's process-wide state after the test. The training entry points reset it themselves;
    this covers a test that builds an Accelerator by hand or stops a run half-way (opt in as for one_thread)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def write_jsonl(path: Path, rows) -> Path:
    """Write ``rows`` as a JSON-lines file (test data in the datasets' real format)."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_argv(model_dir, data, out, *extra, seq_len: int = 64) -> list[str]:
    """A training script's flags for a tiny CPU run on ``data`` (question/answer rows), written to ``out``."""
    return ["--model_name", str(model_dir), "--dataset", str(data), "--prompt_field", "question", "--answer_field",
            "answer", "--seq_len", str(seq_len), "--batch_size", "2", "--log_every", "1", "--output_dir", str(out),
            "--device", "cpu", *extra]
