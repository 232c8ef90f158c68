"""Bad model inputs fail with one clear line naming the file or key and the fix, before expensive work."""
import json
import os

import pytest
import torch

from remedi.model import checkpoint as C
from remedi.model.config import LLaDAConfig, get_config
from remedi.model.llada import RemeDiLM, UPSHead, init_weights
from tests.helpers.files import data_offset, flip_byte


def model(cfg=None, seed=0):
    m = RemeDiLM(cfg or get_config("test-tiny"))
    init_weights(m, std=0.1, generator=torch.Generator().manual_seed(seed))
    return m.eval()


def head_ups(tmp_path, suffix=".pt", width=8):
    m = model()
    m.attach_head(UPSHead(m.config.d_model, width))
    return C.save_ups(tmp_path / f"ups{suffix}", m)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------- config.json
def raw_config(**changes):
    return dict(get_config("test-tiny").to_hf_dict(), **changes)


@pytest.mark.parametrize("key,value,expect", [
    ("max_sequence_length", "abc", r"max_sequence_length must be an integer, got 'abc' \(str\)"),
    ("d_model", 64.0, r"d_model must be an integer, got 64.0 \(float\)"),
    ("n_layers", True, r"n_layers must be an integer, got True \(bool\)"),
    ("rope_theta", "1e4", r"rope_theta must be a number, got '1e4' \(str\)"),
    ("eos_token_id", [95, 94], r"eos_token_id must be an integer, got \[95, 94\] \(list\)"),
    ("ups_taps", "0,2", r"ups_taps must be a list of integer block indices, got '0,2' \(str\)"),
    ("max_sequence_length", 0, "max_sequence_length must be positive, got 0"),
    ("rms_norm_eps", -1e-5, "rms_norm_eps must be positive"),
    ("mask_token_id", 500, r"mask_token_id=500 is not a token id of the embedding \(0 <= id < embedding_size=97\)"),
    ("model_type", 3, "model_type=3 is not a LLaDA/RemeDi config"),
    ("mlp_hidden_size", None, "needs mlp_hidden_size"),
])
def test_bad_config_values_name_the_key_and_type(key, value, expect):
    raw = raw_config(**{key: value})
    with pytest.raises(ValueError, match=rf"^cfg/config.json: .*{expect}") as e:
        LLaDAConfig.from_hf_dict(raw, source="cfg/config.json")
    one_line(e)


@pytest.mark.parametrize("key,value", [("rope_scaling", {"type": "linear", "factor": 2.0}),
                                       ("rope_scaling", {}), ("sliding_window", 1024),
                                       ("tie_word_embeddings", True), ("attention_bias", True), ("head_dim", 8),
                                       ("bias_for_layer_norm", True), ("multi_query_attention", True),
                                       ("clip_qkv", 8.0), ("embedding_dropout", "0.1")])
def test_options_that_change_the_math_are_refused(key, value):
    with pytest.raises(ValueError, match=rf"config.json: {key}=.*not supported|unsupported LLaDA option {key}=") as e:
        LLaDAConfig.from_hf_dict(raw_config(**{key: value}))
    one_line(e)


def test_unknown_keys_are_named_in_one_warning(caplog):
    raw = raw_config(foo_scale=2, my_new_option=True, flash_attention=True, init_fn="normal")
    with caplog.at_level("WARNING", logger="remedi.model.config"):
        cfg = LLaDAConfig.from_hf_dict(raw, source="m/config.json")
    assert cfg == get_config("test-tiny")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "m/config.json: ignoring keys this implementation does not read: foo_scale, " \
                               "my_new_option;" in msgs[0]
    assert cfg.to_hf_dict()["foo_scale"] == 2  # kept for save_pretrained


def test_rope_full_precision_false_warns(caplog):
    with caplog.at_level("WARNING", logger="remedi.model.config"):
        LLaDAConfig.from_hf_dict(raw_config(rope_full_precision=False))
    assert any("rope_full_precision=false" in r.getMessage() for r in caplog.records)


def test_config_json_that_is_not_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"d_model": 64,')
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json is not valid JSON") as e:
        C.load_pretrained(tmp_path)
    one_line(e)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object of config keys, got list"):
        C.load_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------- model shards
class CountingOpen:
    """Wraps safe_open to count tensors read (headers are free): the checks must come first."""

    def __init__(self, monkeypatch):
        self.tensors = 0
        real = C.safe_open
        outer = self

        class Handle:
            def __init__(self, *a, **kw):
                self.h = real(*a, **kw)

            def __enter__(self):
                self.h.__enter__()
                return self

            def __exit__(self, *exc):
                return self.h.__exit__(*exc)

            def get_tensor(self, key):
                outer.tensors += 1
                return self.h.get_tensor(key)

            def __getattr__(self, name):
                return getattr(self.h, name)

        monkeypatch.setattr(C, "safe_open", Handle)


@pytest.fixture
def sharded(tmp_path):
    C.save_pretrained(model(), tmp_path / "m", max_shard_bytes=60_000)
    return tmp_path / "m"


def last_shard(d):
    return sorted(d.glob("model-*.safetensors"))[-1]


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage", "empty"])
def test_truncated_or_corrupt_shard_names_the_file_before_reading_tensors(sharded, damage, monkeypatch):
    shard = last_shard(sharded)
    data = shard.read_bytes()
    shard.write_bytes({"truncate_data": data[:-100], "truncate_header": data[:40], "garbage": b"\x13" * 500,
                       "empty": b""}[damage])
    counter = CountingOpen(monkeypatch)
    with pytest.raises(ValueError, match=rf"{shard} is truncated or corrupt: not a readable safetensors file "
                                         r"\(SafetensorError: .*\); download or copy it again") as e:
        C.load_pretrained(sharded)
    one_line(e)
    assert counter.tensors == 0


def test_shape_and_key_mismatch_found_from_headers_alone(sharded, monkeypatch):
    counter = CountingOpen(monkeypatch)
    raw = json.loads((sharded / "config.json").read_text())
    (sharded / "config.json").write_text(json.dumps(dict(raw, mlp_hidden_size=48)))
    with pytest.raises(ValueError, match=r"model-\d+-of-\d+.safetensors: model.transformer.blocks.0.ff_proj.weight "
                                         r"has shape \(96, 64\), config.json implies \(48, 64\)"):
        C.load_pretrained(sharded)
    (sharded / "config.json").write_text(json.dumps(dict(raw, n_layers=5)))
    with pytest.raises(ValueError, match=r"missing \['model.transformer.blocks.4"):
        C.load_pretrained(sharded)
    assert counter.tensors == 0
    (sharded / "config.json").write_text(json.dumps(raw))
    assert C.load_pretrained(sharded, dtype=torch.float32).config.n_layers == 4
    assert counter.tensors > 0


def test_corrupt_shard_index_is_named(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=rf"{index} is not a valid safetensors index .*weight_map"):
        C.load_pretrained(sharded)


# ------------------------------------------------------------------------------------------- UPS files
@pytest.mark.parametrize("cut", ["empty", 0.5, -30, -1])
def test_truncated_pt_ups_names_file(tmp_path, cut):
    path = head_ups(tmp_path)
    data = path.read_bytes()
    path.write_bytes(b"" if cut == "empty" else data[:int(len(data) * cut) if cut == 0.5 else cut])
    for reader in (C.read_ups_meta, C.read_ups, lambda p: C.load_ups(p, model())):
        with pytest.raises(ValueError, match=rf"{path} is not a readable UPS checkpoint: .*truncated") as e:
            reader(path)
        one_line(e)
        assert "Errno" not in str(e.value)


def test_pt_that_is_not_a_torch_file_is_named(tmp_path):
    path = tmp_path / "ups.pt"
    path.write_text("this is a text file, not a checkpoint")
    with pytest.raises(ValueError, match=rf"{path} is not a readable UPS checkpoint: not a torch.save file"):
        C.read_ups_meta(path)


def test_pickled_code_is_refused_with_the_reason(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {}, "meta": "{}", "x": Evil()}, tmp_path / "evil.pt")
    for reader in (C.read_ups_meta, C.read_ups):
        with pytest.raises(ValueError, match=r"evil.pt is not a readable UPS checkpoint: weights_only loading "
                                             r"refused its contents \(.*system") as e:
            reader(tmp_path / "evil.pt")
        assert "weights_only` set to `False`" not in str(e.value)  # never suggest the unsafe loader


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupt_safetensors_ups_names_file(tmp_path, damage):
    path = head_ups(tmp_path, ".safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-7]
    else:
        data[10] = ord("}")  # inside the JSON header
    path.write_bytes(bytes(data))
    for reader in (C.read_ups_meta, C.read_ups):
        with pytest.raises(ValueError, match=rf"{path} is truncated or corrupt: not a readable safetensors file") as e:
            reader(path)
        one_line(e)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bad_metadata_is_named(tmp_path, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"ups{suffix}"

    def write(meta_text):
        t = {"ups_head.net.weight": torch.zeros(1, 64), "ups_head.net.bias": torch.zeros(1)}
        if suffix == ".pt":
            torch.save({"state_dict": t, "meta": meta_text}, path)
        else:
            save_file(t, str(path), metadata=None if meta_text is None else {"remedi_meta": meta_text})

    for text, expect in [(None, "has no UPS metadata"), ("{oops", "UPS metadata is not valid JSON"),
                         ('{"ups_arch": "mlp"}', "no valid ups_arch .found 'mlp'"),
                         ('{"ups_arch": "head", "hidden_size": "64"}', "hidden_size must be an integer"),
                         ('{"ups_arch": "stream", "hidden_size": 64, "ups_taps": [3, 1]}',
                          "ups_taps must be a non-empty, strictly increasing list")]:
        write(text)
        with pytest.raises(ValueError, match=rf"{path}.*{expect}") as e:
            C.read_ups_meta(path)
        one_line(e)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("arch", ["head", "stream"])
def test_nonfinite_ups_weights_are_refused(tmp_path, suffix, arch, caplog):
    m = model()
    if arch == "head":
        m.attach_head(UPSHead(m.config.d_model, 8))
        bad, name = m.ups_head.net[0].weight, "ups_head.net.0.weight"
    else:
        C.add_stream(m, (1, 3))
        bad, name = m.model.blocks_upm[1].q_proj.weight, "model.blocks_upm.1.q_proj.weight"
    with torch.no_grad():
        bad[0, :3] = float("nan")
        bad[1, 0] = float("inf")
    with caplog.at_level("WARNING", logger="remedi.model.checkpoint"):
        path = C.save_ups(tmp_path / f"ups{suffix}", m)
    assert any("non-finite" in r.getMessage() and name in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=rf"{path}: UPS tensor {name} holds 4 non-finite values \(NaN/inf\)") as e:
        C.read_ups(path)
    one_line(e)
    fresh = model()
    with pytest.raises(ValueError, match="non-finite"):
        C.load_ups(path, fresh)
    assert fresh.ups_head is None and not fresh.model.has_stream  # refused before the model was changed


def test_corrupt_stream_leaves_the_model_unchanged(tmp_path):
    m = model()
    C.add_stream(m, (1, 3))
    path = C.save_ups(tmp_path / "stream.safetensors", m)
    flip_byte(path, data_offset(path) + 3)
    fresh = model()
    with pytest.raises(ValueError, match="stream.safetensors is corrupt: tensor model.* sha256"):
        C.load_ups(path, fresh)
    assert not fresh.model.has_stream and fresh.config.ups_taps == ()


def test_stream_tensors_that_do_not_fit_are_named(tmp_path):
    """A stream file whose tensors disagree with its taps: named before the model gains a stream."""
    from safetensors.torch import save_file

    m = model()
    C.add_stream(m, (1, 3))
    state, meta = C.ups_state(m)
    state = {k: v.detach().contiguous() for k, v in state.items() if not k.startswith("model.blocks_upm.1.")}
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "s.safetensors"), metadata={"remedi_meta": json.dumps(meta)})
    fresh = model()
    with pytest.raises(ValueError, match=r"s.safetensors: stream UPS tensors do not match taps \(1, 3\) on this "
                                         r"backbone: missing \['blocks_upm.1.*unexpected \['extra.weight'\]"):
        C.load_ups(tmp_path / "s.safetensors", fresh)
    assert not fresh.model.has_stream
