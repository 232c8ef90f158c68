import pytest
import torch

from remedi.model.config import LLaDAConfig, get_config
from remedi.model.llada import KVCache, RemeDiLM, UPSHead, init_weights
from remedi.model.loading import LORA_AUTO_TARGET
from tests import reference_llada


def make(cfg, seed=0, std=0.2):
    m = RemeDiLM(cfg)
    init_weights(m, std=std, generator=torch.Generator().manual_seed(seed))
    return m.eval()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"rope_theta": 500000.0, "n_layers": 2}])
def test_logits_match_plain_reference(overrides, gen):
    cfg = get_config("test-tiny", **overrides)
    m = make(cfg, std=0.05)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=gen)
    ref = reference_llada.forward(m.state_dict(), cfg, ids)
    out = m(ids).logits.double()
    assert out.shape == (2, 13, cfg.vocab_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padding_mask_matches_reference_and_left_equals_right(gen):
    cfg = get_config("test-tiny")
    m = make(cfg, std=0.05)
    real = torch.randint(0, 90, (1, 9), generator=gen)
    pad = cfg.pad_token_id
    left = torch.cat([torch.full((1, 4), pad), real], 1)
    right = torch.cat([real, torch.full((1, 4), pad)], 1)
    lmask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], 1).long()
    rmask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1).long()
    out_l = m(left, lmask).logits[:, 4:]
    out_r = m(right, rmask).logits[:, :9]
    alone = m(real).logits
    torch.testing.assert_close(out_l, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_r, alone, atol=1e-5, rtol=1e-5)
    ref = reference_llada.forward(m.state_dict(), cfg, left, lmask)[:, 4:]
    torch.testing.assert_close(out_l.double(), ref, atol=1e-5, rtol=1e-5)
    # without the mask the padding changes the answer: the test would notice a mask that is ignored
    assert (m(left).logits[:, 4:] - alone).abs().max() > 1e-3


def test_stream_with_zero_bridges_leaves_backbone_bit_identical(gen):
    cfg = get_config("test-tiny")
    plain = make(cfg)
    streamed = RemeDiLM(cfg.replace(ups_taps=(0, 2)))
    init_weights(streamed, generator=torch.Generator().manual_seed(5))
    missing = streamed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("model.") and "transformer" not in k for k in missing)
    ids = torch.randint(0, 90, (3, 11), generator=gen)
    a, b = plain(ids), streamed.eval()(ids)
    assert torch.equal(a.logits, b.logits)
    assert b.ups_logits.shape == (3, 11) and a.ups_logits is None
    # a non-zero bridge does change the backbone: the taps are live
    with torch.no_grad():
        streamed.model.backprop_linears[1].bias.fill_(0.5)
    assert not torch.equal(a.logits, streamed(ids).logits)


def test_official_stream_key_names():
    cfg = get_config("test-tiny", ups_taps=(0, 1, 2, 3))
    keys = set(RemeDiLM(cfg).state_dict())
    for k in ["model.blocks_upm.0.q_proj.weight", "model.blocks_upm.3.ff_out.weight", "model.backprop_norms.2.weight",
              "model.backprop_linears.1.weight", "model.backprop_linears.1.bias", "model.ln_f_upm.weight",
              "model.linear_confidence.weight", "model.linear_confidence.bias", "model.transformer.ff_out.weight"]:
        assert k in keys, k


@pytest.mark.parametrize("taps", [(), (1, 3)])
def test_kv_cache_slice_equals_full_forward(taps, gen):
    cfg = get_config("test-tiny", ups_taps=taps)
    m = make(cfg)
    with torch.no_grad():
        for lin in getattr(m.model, "backprop_linears", []):
            lin.weight.normal_(0, 0.05)  # make the stream matter
    ids = torch.randint(0, 90, (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0
    cache = KVCache()
    full = m(ids, mask, cache=cache)
    part = m(ids[:, 8:12], mask, cache=cache, start=8)
    torch.testing.assert_close(part.logits, full.logits[:, 8:12], atol=1e-5, rtol=1e-5)
    if taps:
        torch.testing.assert_close(part.ups_logits, full.ups_logits[:, 8:12], atol=1e-5, rtol=1e-5)
    # a stale cache gives a different (approximate) answer once the rest of the sequence changes
    ids2 = ids.clone()
    ids2[:, :8] = (ids2[:, :8] + 1) % 90
    stale = m(ids2[:, 8:12], mask, cache=cache, start=8).logits
    assert (stale - m(ids2, mask).logits[:, 8:12]).abs().max() > 1e-4


def test_out_slice_and_head(gen):
    cfg = get_config("test-tiny")
    m = make(cfg)
    m.attach_head(UPSHead(cfg.d_model, 16))
    ids = torch.randint(0, 90, (2, 10), generator=gen)
    full = m(ids)
    sl = m(ids, out_slice=slice(4, 8))
    torch.testing.assert_close(sl.logits, full.logits[:, 4:8])
    torch.testing.assert_close(sl.ups_logits, full.ups_logits[:, 4:8])
    with pytest.raises(ValueError, match="hidden size 32 != backbone d_model 64"):
        make(cfg).attach_head(UPSHead(32))


def test_head_loss_never_reaches_backbone(gen):
    cfg = get_config("test-tiny")
    m = make(cfg).train()
    m.attach_head(UPSHead(cfg.d_model))
    m(torch.randint(0, 90, (2, 7), generator=gen)).ups_logits.sum().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("ups_head"))
    assert m.ups_head.net.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_gradients(gen):
    cfg = get_config("test-tiny", ups_taps=(1,))
    ids = torch.randint(0, 90, (2, 9), generator=gen)
    grads = []
    for ckpt in (False, True):
        m = make(cfg).train()
        m.set_gradient_checkpointing(ckpt)
        out = m(ids)
        (out.logits.square().mean() + out.ups_logits.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_every_block(gen, lora):
    """With checkpointing each block runs again in the backward (also when LoRA wraps the backbone)."""
    cfg = get_config("test-tiny")
    ids = torch.randint(0, 90, (2, 9), generator=gen)
    calls = {}
    for ckpt in (False, True):
        m = make(cfg).train()
        if lora:
            from peft import LoraConfig, get_peft_model

            m.model = get_peft_model(m.model, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_AUTO_TARGET))
        m.set_gradient_checkpointing(ckpt)
        n = [0]
        blocks = [mod for name, mod in m.named_modules() if type(mod).__name__ == "LLaDABlock"]
        for b in blocks:
            b.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))  # recomputation may stop early
        m(ids).logits.square().mean().backward()
        calls[ckpt] = n[0]
    assert calls == {False: cfg.n_layers, True: 2 * cfg.n_layers}


@pytest.mark.parametrize("key,value", [("alibi", True), ("include_bias", True), ("weight_tying", True),
                                       ("block_type", "sequential"), ("activation_type", "gelu"),
                                       ("attention_dropout", 0.1)])
def test_unsupported_config_is_named(key, value):
    raw = get_config("test-tiny").to_hf_dict()
    raw[key] = value
    with pytest.raises(ValueError, match=key):
        LLaDAConfig.from_hf_dict(raw)


def test_config_roundtrip_and_remedi_default_taps():
    cfg = get_config("llada-8b")
    raw = cfg.to_hf_dict()
    assert raw["model_type"] == "llada" and raw["d_model"] == 4096
    assert LLaDAConfig.from_hf_dict(raw) == cfg
    remedi = dict(raw, model_type="RemeDi")
    assert LLaDAConfig.from_hf_dict(remedi).ups_taps == (0, 10, 20, 30)
    with pytest.raises(ValueError, match="ups_taps"):
        LLaDAConfig.from_hf_dict(dict(get_config("test-tiny").to_hf_dict(), model_type="RemeDi"))


def test_8b_parameter_count_matches_published():
    with torch.device("meta"):
        m = RemeDiLM(get_config("llada-8b"))
    assert m.num_parameters() == 8_015_581_184
    with torch.device("meta"):
        s = RemeDiLM(get_config("llada-8b", ups_taps=(0, 10, 20, 30)))
    extra = s.num_parameters() - m.num_parameters()
    assert 0.9e9 < extra < 1.0e9  # RemeDi paper: about 0.94B extra


# The LLaDA-8B-Base config.json as the hub ships it (OLMo-style keys, auto_map for the remote code).
HUB_8B_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False,
}


def test_hub_8b_config_loads_quietly(caplog):
    with caplog.at_level("WARNING", logger="remedi.model.config"):
        cfg = LLaDAConfig.from_hf_dict(HUB_8B_CONFIG)
    assert cfg == get_config("llada-8b") and not caplog.records
    assert cfg.to_hf_dict()["auto_map"] == HUB_8B_CONFIG["auto_map"]  # kept for save_pretrained


@pytest.mark.parametrize("key,value", [("bias_for_layer_norm", None), ("multi_query_attention", False),
                                       ("rope_scaling", None), ("n_kv_heads", None), ("head_dim", 128)])
def test_official_config_defaults_are_accepted(key, value, caplog):
    """The official config class's defaults: bias_for_layer_norm None = same as include_bias (False)."""
    with caplog.at_level("WARNING", logger="remedi.model.config"):
        cfg = LLaDAConfig.from_hf_dict(dict(HUB_8B_CONFIG, **{key: value}))
    assert cfg == get_config("llada-8b") and not caplog.records
    # written back as found (n_kv_heads, a field, is written resolved)
    assert cfg.to_hf_dict()[key] == (32 if key == "n_kv_heads" else value)


def test_bias_for_layer_norm_null_loads_a_checkpoint(tmp_path, gen):
    import json

    from remedi.model.checkpoint import load_pretrained, save_pretrained

    m = make(get_config("test-tiny"))
    save_pretrained(m, tmp_path / "m")
    raw = json.loads((tmp_path / "m/config.json").read_text())
    raw["bias_for_layer_norm"] = None
    (tmp_path / "m/config.json").write_text(json.dumps(raw))
    ids = torch.randint(0, 90, (1, 7), generator=gen)
    assert torch.equal(load_pretrained(tmp_path / "m", dtype=torch.float32)(ids).logits, m(ids).logits)


def test_mlp_hidden_size_null_falls_back_to_mlp_ratio():
    raw = dict(get_config("test-tiny").to_hf_dict(), mlp_hidden_size=None, mlp_ratio=1.5)
    assert LLaDAConfig.from_hf_dict(raw).mlp_hidden_size == 96
