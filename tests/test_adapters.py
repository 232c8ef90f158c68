"""LoRA adapters from other LLaDA tools: the hub's remote-code LLaDAModelLM layout maps onto the native model."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from remedi.model import checkpoint as C
from remedi.model.config import LLaDAConfig
from remedi.model.loading import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_lora, load_model, lora_plan, native_lora_key,
                                  preflight)
from tests.conftest import build_model_dir

HUB_TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]


class HubLLaDAModelLM(torch.nn.Module):
    """The module tree of the hub's ``LLaDAModelLM`` (remote code): the LLaDA model sits under ``.model``."""

    def __init__(self, inner):
        super().__init__()
        self.model = inner
        self.config = {"model_type": "llada"}  # the hub config is a PretrainedConfig; peft reads it as a dict

    def forward(self, input_ids):
        return self.model(input_ids)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):  # a PreTrainedModel has it (peft's CAUSAL_LM asks)
        return {"input_ids": input_ids}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("base") / "llada")


def hub_adapter(base_dir, out, seed=1, targets=HUB_TARGETS, r=4, alpha=8):
    """A LoRA adapter saved by peft from a model laid out as the hub's LLaDAModelLM (d1 / dllm users' files)."""
    inner = C.load_pretrained(base_dir, dtype=torch.float32).model
    pm = get_peft_model(HubLLaDAModelLM(inner), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                          task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # non-zero B too, so the adapter really changes the weights
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(out))
    return out


def hand_merged(base_dir, adapter_dir):
    """The base model with every W += (alpha / r) * B @ A applied by hand from the adapter's own files."""
    conf = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    scale = conf["lora_alpha"] / conf["r"]
    lm = C.load_pretrained(base_dir, dtype=torch.float32)
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    params = dict(lm.model.named_parameters())
    n = 0
    with torch.no_grad():
        for k, a in tensors.items():
            if ".lora_A." not in k:
                continue
            module = k.removeprefix("base_model.model.model.").split(".lora_A.")[0]
            b = tensors[k.replace(".lora_A.", ".lora_B.")]
            params[module + ".weight"] += scale * (b @ a)
            n += 1
    return lm.eval(), n


def test_hub_layout_adapter_changes_the_model_as_a_hand_merge(base_dir, tmp_path, gen):
    adapter = hub_adapter(base_dir, tmp_path / "hub_lora")
    keys = load_file(str(adapter / ADAPTER_WEIGHTS))
    assert all(k.startswith("base_model.model.model.transformer.") for k in keys)  # the real hub layout
    cfg = LLaDAConfig.from_json_file(base_dir / "config.json")
    plan = lora_plan(adapter, cfg)
    assert plan.layout == "hub" and "transformer.blocks.0.q_proj" in plan.modules
    assert "transformer.ff_out" in plan.modules  # the LM head is named ff_out in both layouts, and maps too
    loaded = load_model(base_dir, cfg, lora_path=str(adapter), device="cpu", dtype="float32")
    ref, n_merged = hand_merged(base_dir, adapter)
    assert n_merged == len(plan.modules) == 7 * cfg.n_layers + 1
    base = C.load_pretrained(base_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 90, (2, 12), generator=gen)
    with torch.no_grad():
        out, want, before = loaded(ids).logits, ref(ids).logits, base(ids).logits
    assert (out - before).abs().max() > 1e-2  # not a silent no-op
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_native_adapter_still_loads_as_saved(base_dir, tmp_path, gen):
    lm = C.load_pretrained(base_dir, dtype=torch.float32)
    pm = get_peft_model(lm.model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "ff_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    pm.save_pretrained(str(tmp_path / "native"))
    ids = torch.randint(0, 90, (1, 10), generator=gen)
    with torch.no_grad():
        want = lm(ids).logits
    cfg = LLaDAConfig.from_json_file(base_dir / "config.json")
    assert lora_plan(tmp_path / "native", cfg).layout == "native"
    fresh = C.load_pretrained(base_dir, dtype=torch.float32)
    fresh.model = load_lora(fresh.model, tmp_path / "native").merge_and_unload()
    with torch.no_grad():
        # the adapter applied unmerged (x W + s x A B) against merged (x (W + s B A)): float32 rounding only
        torch.testing.assert_close(fresh.eval()(ids).logits, want, rtol=0, atol=1e-4)
        with pm.disable_adapter():
            assert (want - lm(ids).logits).abs().max() > 1e-2  # and the adapter does act


def test_adapter_matching_no_module_is_an_error(base_dir, tmp_path):
    bad = tmp_path / "other_model_lora"
    bad.mkdir()
    (bad / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                  "target_modules": ["c_attn"]}))
    save_file({"base_model.model.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.h.0.attn.c_attn.lora_B.weight": torch.zeros(192, 2)}, str(bad / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="matches no module of this model"):
        preflight(str(base_dir), lora_path=str(bad))  # before any weight is read


def test_adapter_for_another_size_or_a_damaged_config_is_refused_in_preflight(base_dir, tmp_path):
    adapter = hub_adapter(base_dir, tmp_path / "a", targets=["q_proj"])
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    k = next(k for k in tensors if ".lora_A." in k)
    tensors[k] = torch.zeros(4, 128)
    save_file(tensors, str(adapter / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="does not fit this model"):
        preflight(str(base_dir), lora_path=str(adapter))
    (adapter / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json.*not valid JSON"):
        preflight(str(base_dir), lora_path=str(adapter))


def test_native_lora_key_layouts():
    tail = "transformer.blocks.3.q_proj.lora_A.weight"
    assert native_lora_key("base_model.model." + tail) == "base_model.model." + tail
    assert native_lora_key("base_model.model.model." + tail) == "base_model.model." + tail
    assert native_lora_key("base_model.model.model.xtransformer.blocks.0.q_proj.lora_A.weight") is None
    assert native_lora_key("base_model.model.h.0.attn.lora_A.weight") is None
