import json
import os

import pytest
import torch
from safetensors.torch import save_file

from remedi.model import checkpoint as C
from remedi.model.config import get_config
from remedi.model.loading import load_for_inference, preflight
from remedi.model.llada import RemeDiLM, UPSHead, init_weights
from tests.conftest import build_model_dir
from tests.helpers.files import data_offset, flip_byte  # noqa: F401


def model(cfg, seed=0):
    m = RemeDiLM(cfg)
    init_weights(m, std=0.1, generator=torch.Generator().manual_seed(seed))
    return m.eval()


@pytest.mark.parametrize("shard_bytes", [2**40, 60_000])
def test_hub_layout_roundtrip(tmp_path, shard_bytes, gen):
    m = model(get_config("test-tiny"))
    C.save_pretrained(m, tmp_path / "ckpt", max_shard_bytes=shard_bytes)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    if shard_bytes < 2**40:
        assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 2
        index = json.loads((tmp_path / "ckpt/model.safetensors.index.json").read_text())
        assert "model.transformer.blocks.0.q_proj.weight" in index["weight_map"]
    else:
        assert "model.safetensors" in files
    raw = json.loads((tmp_path / "ckpt/config.json").read_text())
    assert raw["model_type"] == "llada" and raw["weight_tying"] is False and raw["d_model"] == 64
    loaded = C.load_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.randint(0, 90, (2, 12), generator=gen)
    assert torch.equal(loaded(ids).logits, m(ids).logits)
    bf = C.load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())


def test_loads_checkpoint_with_hub_config_keys(tmp_path, gen):
    """A config.json as the hub writes it (OLMo keys, auto_map) loads; shapes are checked against it."""
    m = model(get_config("test-tiny"))
    C.save_pretrained(m, tmp_path / "hub")
    cfg_path = tmp_path / "hub/config.json"
    raw = json.loads(cfg_path.read_text())
    raw.update({"auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}, "mlp_ratio": 4, "init_fn": "mitchell",
                "rope_full_precision": True, "use_cache": False, "flash_attention": False, "precision": "amp_bf16"})
    cfg_path.write_text(json.dumps(raw))
    assert torch.equal(C.load_pretrained(tmp_path / "hub", dtype=torch.float32)(torch.arange(8)[None]).logits,
                       m(torch.arange(8)[None]).logits)
    raw["d_model"] = 32
    raw["n_heads"] = 4
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="shape"):
        C.load_pretrained(tmp_path / "hub")


def test_official_remedi_layout_loads(tmp_path, gen):
    """Backbone + stream in one checkpoint (RemeDi-Instruct layout) with model_type RemeDi."""
    cfg = get_config("test-tiny", ups_taps=(0, 1, 2, 3))
    m = model(cfg)
    with torch.no_grad():
        for lin in m.model.backprop_linears:
            lin.weight.normal_(0, 0.02)
    C.save_pretrained(m, tmp_path / "remedi")
    raw = json.loads((tmp_path / "remedi/config.json").read_text())
    del raw["ups_taps"]
    raw["model_type"] = "RemeDi"
    raw["n_layers"] = 32  # the official taps 0, 10, 20, 30 need 31+ blocks
    (tmp_path / "remedi/config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="missing"):
        C.load_pretrained(tmp_path / "remedi")
    raw["n_layers"], raw["ups_taps"] = 4, [0, 1, 2, 3]
    (tmp_path / "remedi/config.json").write_text(json.dumps(raw))
    loaded = C.load_pretrained(tmp_path / "remedi", dtype=torch.float32)
    assert loaded.ups_arch == "stream"
    ids = torch.randint(0, 90, (1, 9), generator=gen)
    torch.testing.assert_close(loaded(ids).ups_logits, m(ids).ups_logits)
    # a plain LLaDA config over the same weights names the stream in its error
    raw.pop("ups_taps")
    raw["model_type"] = "llada"
    (tmp_path / "remedi/config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="model_type 'RemeDi'"):
        C.load_pretrained(tmp_path / "remedi")


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        C.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(get_config("test-tiny").to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        C.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a hub id"):
        C.resolve_model_dir("no/such/dir/here")
    with pytest.raises(FileNotFoundError, match="UPS checkpoint not found: .*nope.pt"):
        C.read_ups(tmp_path / "nope.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("arch", ["head", "stream"])
def test_ups_roundtrip(tmp_path, suffix, arch, gen):
    cfg = get_config("test-tiny")
    m = model(cfg)
    if arch == "head":
        m.attach_head(UPSHead(cfg.d_model, 8))
        torch.nn.init.normal_(m.ups_head.net[0].weight)
    else:
        C.add_stream(m, (1, 3))
    path = C.save_ups(tmp_path / f"ups{suffix}", m, extra_meta={"args": {"lr": 1e-4}})
    state, meta = C.read_ups(path)
    assert meta["ups_arch"] == arch and meta["hidden_size"] == 64 and meta["args"]["lr"] == 1e-4
    # only UPS tensors are saved, never the backbone
    assert not any("transformer" in k for k in state)
    fresh = model(cfg)
    C.load_ups(path, fresh)
    ids = torch.randint(0, 90, (2, 10), generator=gen)
    torch.testing.assert_close(fresh(ids).ups_logits, m(ids).ups_logits)
    assert not list(tmp_path.glob(".*tmp"))


def test_ups_mismatch_errors_name_both_sides(tmp_path):
    small = model(get_config("test-tiny"))
    small.attach_head(UPSHead(64))
    path = C.save_ups(tmp_path / "h.pt", small)
    wide = model(get_config("test-tiny", d_model=128))
    with pytest.raises(ValueError, match="hidden size 64.*d_model=128"):
        C.load_ups(path, wide)
    streamed = model(get_config("test-tiny", ups_taps=(1,)))
    with pytest.raises(ValueError, match="head UPS.*stream UPS"):
        C.load_ups(path, streamed)


def test_pt_loader_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {}, "meta": "{}", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable UPS checkpoint"):
        C.read_ups(tmp_path / "evil.pt")


def test_atomic_write_leaves_old_file_on_crash(tmp_path):
    target = tmp_path / "ups.pt"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with C.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-save")
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ups.pt"]


def test_load_for_inference_by_path_and_mask_check(tmp_path, tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir), device="cpu")
    assert loaded.ids.mask == loaded.model.config.mask_token_id == 0 and loaded.ids.eos == 1
    assert loaded.ids.eot == 5 and loaded.ids.bos == 2
    with pytest.raises(ValueError, match="--mask_id 126336 disagrees.*= 0"):
        load_for_inference(str(tiny_model_dir), mask_id=126336)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        preflight(str(tiny_model_dir), lora_path=str(tmp_path))
    other = build_model_dir(tmp_path / "wide", d_model=32, n_heads=2, n_kv_heads=2, mlp_hidden_size=48)
    m = C.load_pretrained(other)
    m.attach_head(UPSHead(32))
    bad = C.save_ups(tmp_path / "wide.pt", m)
    with pytest.raises(ValueError, match="hidden size 32"):
        preflight(str(tiny_model_dir), ups_head=str(bad))


def test_hub_id_goes_through_snapshot_download(monkeypatch, tiny_model_dir):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    m = C.load_pretrained("GSAI-ML/LLaDA-8B-Base", dtype=torch.float32)
    assert calls[0][0] == "GSAI-ML/LLaDA-8B-Base" and "*.safetensors" in calls[0][1]
    assert m.config.d_model == 64

    def failing(repo_id, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(FileNotFoundError, match="not a local directory.*pass its local directory"):
        C.load_pretrained("GSAI-ML/LLaDA-8B-Base")


# ------------------------------------------------------------------------------ UPS metadata and checksums
def _ups_model(arch, width=8):
    cfg = get_config("test-tiny")
    m = model(cfg)
    if arch == "head":
        m.attach_head(UPSHead(cfg.d_model, width))
    else:
        C.add_stream(m, (1, 3))
        with torch.no_grad():
            m.model.backprop_linears[0].weight.normal_(0, 0.02)
    return m






def _bytes_read():
    """Bytes this process has read through read() calls; a memory map does not count."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_read_ups_meta_reads_no_tensor_data(tmp_path, suffix):
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs /proc/self/io (Linux) to count bytes read")
    m = _ups_model("head", width=1 << 16)  # a 16 MB weight
    path = C.save_ups(tmp_path / f"big{suffix}", m, extra_meta={"args": {"lr": 1e-4}})
    assert path.stat().st_size > 16e6
    before = _bytes_read()
    meta = C.read_ups_meta(path)
    assert _bytes_read() - before < 1e6
    assert meta == C.read_ups(path)[1]
    assert meta["ups_arch"] == "head" and meta["ups_width"] == 1 << 16 and meta["args"] == {"lr": 1e-4}
    assert sorted(meta[C.CHECKSUM_KEY]) == ["ups_head.net.0.bias", "ups_head.net.0.weight", "ups_head.net.2.bias",
                                            "ups_head.net.2.weight"]
    C.check_ups_compatible(meta, get_config("test-tiny"), str(path))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checksum_is_stored_and_verified(tmp_path, suffix):
    m = _ups_model("head")
    # a checksum in extra_meta (e.g. metadata copied from the file a run started from) never wins
    path = C.save_ups(tmp_path / f"ups{suffix}", m, extra_meta={C.CHECKSUM_KEY: {"stale": "0" * 64}})
    state, meta = C.read_ups(path)
    assert meta[C.CHECKSUM_KEY] == {k: C.tensor_sha256(v) for k, v in state.items()}
    assert meta[C.CHECKSUM_KEY]["ups_head.net.0.weight"] == C.tensor_sha256(m.ups_head.net[0].weight)
    flip_byte(path, data_offset(path) + 5)
    C.read_ups_meta(path)  # the header is intact: preflight still reads it
    with pytest.raises(ValueError, match=rf"{path.name} is corrupt: tensor ups_head\..* does not match the sha256"):
        C.read_ups(path)
    fresh = model(get_config("test-tiny"))
    with pytest.raises(ValueError, match="is corrupt"):
        C.load_ups(path, fresh)
    assert fresh.ups_head is None


@pytest.mark.parametrize("arch", ["head", "stream"])
def test_flipped_byte_in_pt_data_is_refused(tmp_path, arch):
    """torch.load does not check the zip CRC of tensor records; the stored sha256 does."""
    path = C.save_ups(tmp_path / "ups.pt", _ups_model(arch))
    flip_byte(path, data_offset(path) + 1)
    import zipfile

    with zipfile.ZipFile(path) as zf:  # the flip really is inside a tensor record
        assert zf.testzip() is not None
    with pytest.raises(ValueError, match=r"ups\.pt is corrupt: tensor .* sha256"):
        C.read_ups(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_files_without_checksum_load_with_a_note(tmp_path, suffix, caplog, gen):
    """UPS files written before checksums were stored (same layout, no tensor_sha256) still load."""
    m = _ups_model("head")
    state, meta = C.ups_state(m)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    meta = {"format_version": 1, **meta, "base_model": None}
    path = tmp_path / f"old{suffix}"
    if suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"remedi_meta": json.dumps(meta)})
    else:
        torch.save({"state_dict": tensors, "meta": json.dumps(meta)}, path)
    assert C.read_ups_meta(path) == meta
    fresh = model(get_config("test-tiny"))
    with caplog.at_level("INFO", logger="remedi.model.checkpoint"):
        C.load_ups(path, fresh)
    assert any(f"{path} has no tensor checksum" in r.getMessage() for r in caplog.records)
    ids = torch.randint(0, 90, (1, 8), generator=gen)
    torch.testing.assert_close(fresh(ids).ups_logits, m(ids).ups_logits)


# ------------------------------------------------------------------------------ shipped UPS files, formats, cards
def _tensor_ranges(path):
    """(start, end) byte ranges of every tensor record's data inside a torch.save archive."""
    import zipfile

    out = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset + 26)
                n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                start = info.header_offset + 30 + n + m
                out.append((start, start + info.file_size))
    return out


@pytest.mark.parametrize("name", ["ups_head.pt", "ups_head_lora.pt"])
def test_shipped_ups_files_carry_a_checksum_that_catches_random_bit_flips(tmp_path, name):
    from remedi.model.loading import EMBEDDED_MODEL

    shipped = EMBEDDED_MODEL / name
    state, meta = C.read_ups(shipped)
    assert meta[C.CHECKSUM_KEY] == {k: C.tensor_sha256(v) for k, v in state.items()}  # stored, and verified
    blob = shipped.read_bytes()
    ranges = _tensor_ranges(shipped)
    rng = __import__("random").Random(0)

    def flipped(i, pos):
        """A copy of the shipped file with one random bit of byte ``pos`` flipped."""
        bad = bytearray(blob)
        bad[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(bytes(bad))
        return path

    # every bit flip inside the tensors is refused (without the checksum torch.load takes nearly all of them)
    for i in range(120):
        start, end = ranges[rng.randrange(len(ranges))]
        with pytest.raises(ValueError, match="corrupt|not a readable|non-finite"):
            C.read_ups(flipped(i, rng.randrange(start, end)))
    # anywhere in the file: either refused, or the tensors read back are exactly the shipped ones (a flip in
    # zip padding or in a metadata string); never different weights loaded silently
    refused = 0
    for i in range(120):
        pos = rng.randrange(len(blob))
        try:
            got, _ = C.read_ups(flipped(i, pos))
        except ValueError:
            refused += 1
        else:
            assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state), pos
    assert refused > 60  # the tensor data is most of the file


def test_reseal_adds_a_checksum_and_keeps_tensors_and_meta(tmp_path):
    m = _ups_model("head")
    state, meta = C.ups_state(m)
    old = tmp_path / "old.pt"
    torch.save({"state_dict": {k: v.detach() for k, v in state.items()}, "meta": json.dumps({"format_version": 1,
                **meta, "base_model": "x/y", "kind": "residual"})}, old)
    assert C.CHECKSUM_KEY not in C.read_ups_meta(old)
    new = C.reseal_ups(old, tmp_path / "new.safetensors")  # and converts to safetensors
    got, got_meta = C.read_ups(new)
    assert got_meta[C.CHECKSUM_KEY] and got_meta["kind"] == "residual" and got_meta["base_model"] == "x/y"
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_ups_save_writes_a_model_card(tmp_path):
    m = _ups_model("head")
    m.name_or_path = "GSAI-ML/LLaDA-8B-Base"
    path = C.save_ups(tmp_path / "ups.safetensors", m, extra_meta={
        "args": {"dataset": "simplescaling/s1K-1.1", "lr": 1e-4, "lambda_ups": 1.0, "script": "train_remask_sft"},
        "train": {"step": 7, "dataset": "simplescaling/s1K-1.1"}, "results": {"gsm8k accuracy": 0.5}})
    card = C.ups_card_path(path).read_text()
    assert C.ups_card_path(path).name == "ups.md"
    assert "base_model: GSAI-ML/LLaDA-8B-Base" in card and "train_remask_sft.py" in card
    assert "| --lr | 0.0001 |" in card and "simplescaling/s1K-1.1" in card and "| gsm8k accuracy | 0.5 |" in card
    assert "--ups_head ups.safetensors" in card


def test_saved_adapter_records_its_base_model_and_a_card(tmp_path):
    from peft import LoraConfig, get_peft_model

    from remedi.model.loading import load_lora

    lm = model(get_config("test-tiny"))
    pm = get_peft_model(lm.model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    out = C.save_lora(pm, tmp_path / "lora", "GSAI-ML/LLaDA-8B-Base",
                      {"args": {"lora_r": 2, "dataset": "openai/gsm8k"}, "train": {"step": 3}})
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "GSAI-ML/LLaDA-8B-Base" and "auto_mapping" not in conf
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card and "base_model: GSAI-ML/LLaDA-8B-Base" in card
    assert "openai/gsm8k" in card and "| --lora_r | 2 |" in card and "r=2, alpha=4" in card
    fresh = model(get_config("test-tiny"))
    assert load_lora(fresh.model, out).peft_config["default"].base_model_name_or_path == "GSAI-ML/LLaDA-8B-Base"


def test_shipped_adapter_has_a_base_model_and_no_stale_auto_mapping():
    from remedi.model.loading import EMBEDDED_MODEL

    conf = json.loads((EMBEDDED_MODEL / "lora_joint" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] and "auto_mapping" not in conf
    assert "More Information Needed" not in (EMBEDDED_MODEL / "lora_joint" / "README.md").read_text()
