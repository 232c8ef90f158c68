import re

import torch
from peft import LoraConfig, get_peft_model

from remedi.model.config import get_config
from remedi.model.loading import LORA_AUTO_TARGET
from remedi.model.llada import RemeDiLM, UPSHead, init_weights


def test_lora_auto_targets_block_linears_only():
    cfg = get_config("test-tiny")
    m = RemeDiLM(cfg)
    init_weights(m)
    m.attach_head(UPSHead(cfg.d_model))
    pm = get_peft_model(m.model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_AUTO_TARGET))
    wrapped = {n.split(".lora_A")[0] for n, _ in pm.named_parameters() if ".lora_A" in n}
    names = {re.sub(r"blocks\.\d+\.", "", n.split("transformer.")[1]) for n in wrapped}
    assert names == {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}
    assert len(wrapped) == 7 * cfg.n_layers  # the LM head transformer.ff_out is not wrapped
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # a step changes only adapter weights
    before = {n: p.clone() for n, p in m.named_parameters()}
    for p in m.ups_head.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        m(torch.randint(0, 90, (2, 8))).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in m.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
