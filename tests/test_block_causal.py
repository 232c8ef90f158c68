"""Block-causal layout [prompt | clean | noisy]: the mask table, positions, and equality with a per-block loop."""
import pytest
import torch

from remedi.model.block_causal import (block_causal_forward, block_causal_mask, block_causal_positions,
                                       block_noise, prefix_mask)
from remedi.model.config import get_config
from remedi.model.llada import KVCache, RemeDiLM, UPSHead, init_weights
from tests.helpers.block_causal import make, cached_reference  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")




def batch(gen, P=5, G=12, pad=(0, 2), vocab=90, mask_id=96):
    """Two rows, left-padded prompts (row b has pad[b] padding tokens), clean answers, partly masked copies."""
    B = len(pad)
    prompt = torch.randint(0, vocab, (B, P), generator=gen)
    pm = torch.ones(B, P, dtype=torch.bool)
    for b, n in enumerate(pad):
        prompt[b, :n] = 95
        pm[b, :n] = False
    clean = torch.randint(0, vocab, (B, G), generator=gen)
    noisy = torch.where(torch.rand(B, G, generator=gen) < 0.5, torch.full_like(clean, mask_id),
                        torch.randint(0, vocab, (B, G), generator=gen))
    return prompt, pm if not pm.all() else None, clean, noisy


def test_mask_table_is_exact():
    # P = 2, G = 4, Lb = 2: rows/cols = p0 p1 | c0 c0 c1 c1 | n0 n0 n1 n1
    m = block_causal_mask(2, 4, 2)[0, 0].int()
    want = torch.tensor([
        # p p  c0c0 c1c1 n0n0 n1n1
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # prompt sees the prompt only
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # clean block 0: prompt + itself
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # clean block 1: prompt + clean 0 + itself
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],  # noisy block 0: prompt + itself (no clean block 0)
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],  # noisy block 1: prompt + clean 0 + itself
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(m, want)
    assert torch.equal(prefix_mask(2, 4, 2)[0, 0].int(), want[:6, :6])
    pos = block_causal_positions(2, 4, 1)[0].tolist()
    assert pos == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]


def test_padding_keys_hidden_and_pad_queries_see_themselves():
    pm = torch.tensor([[False, True, True]])
    m = block_causal_mask(3, 4, 2, pm)[0, 0]
    assert not m[1:, 0].any()  # nobody reads the padding key
    assert m[0].tolist() == [True] + [False] * 10  # the padding query attends to itself alone




@pytest.mark.parametrize("arch", ["head", "stream"])
@pytest.mark.parametrize("pad", [(0, 0), (0, 2)])
def test_noisy_half_equals_per_block_loop(arch, pad, gen):
    m = make(arch)
    Lb = 4
    prompt, pm, clean, noisy = batch(gen, pad=pad)
    G = clean.shape[1]
    with torch.no_grad():
        out = block_causal_forward(m, prompt, clean, noisy, Lb, pm)
        assert out.logits.shape == (2, G, m.config.vocab_size) and out.ups_logits.shape == (2, G)
        for j in range(G // Lb):
            blocks = [clean[:, i * Lb:(i + 1) * Lb] for i in range(j)] + [noisy[:, j * Lb:(j + 1) * Lb]]
            ref = cached_reference(m, prompt, pm, blocks)
            sl = slice(j * Lb, (j + 1) * Lb)
            torch.testing.assert_close(out.logits[:, sl], ref.logits, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out.ups_logits[:, sl], ref.ups_logits, atol=2e-5, rtol=1e-5)
        # the layout is not a no-op: a bidirectional pass over [prompt | clean < j | noisy j] differs
        x = torch.cat([prompt, clean[:, :Lb], noisy[:, Lb:2 * Lb]], 1)
        assert (m(x).logits[:, -Lb:] - out.logits[:, Lb:2 * Lb]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["head", "stream"])
def test_prefix_mask_equals_kv_cache_decoding(arch, gen):
    """The clean half alone ([prompt | blocks], prefix_mask) is what block-wise KV-cache decoding computes."""
    m = make(arch)
    Lb = 4
    prompt, pm, clean, _ = batch(gen, pad=(0, 2))
    P, G = prompt.shape[1], clean.shape[1]
    with torch.no_grad():
        full = m(torch.cat([prompt, clean], 1), prefix_mask(P, G, Lb, pm))
        for j in range(G // Lb):
            ref = cached_reference(m, prompt, pm, [clean[:, i * Lb:(i + 1) * Lb] for i in range(j + 1)])
            sl = slice(P + j * Lb, P + (j + 1) * Lb)
            torch.testing.assert_close(full.logits[:, sl], ref.logits, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(full.ups_logits[:, sl], ref.ups_logits, atol=2e-5, rtol=1e-5)


def test_explicit_positions_and_full_mask_are_bit_identical_to_defaults(gen):
    m = make("stream")
    ids = torch.randint(0, 90, (2, 9), generator=gen)
    base = m(ids)
    pos = torch.arange(9)[None].expand(2, -1)
    allm = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    assert torch.equal(m(ids, position_ids=pos).logits, base.logits)
    assert torch.equal(m(ids, allm).ups_logits, base.ups_logits)
    # shifted positions change nothing either (RoPE sees only offsets) up to rounding, and are applied
    shifted = m(ids, position_ids=pos + 7)
    torch.testing.assert_close(shifted.logits, base.logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="position_ids"):
        m(ids, position_ids=pos[:, :5])
    with pytest.raises(ValueError, match="4-D attention_mask"):
        m(ids, allm.long())


def test_explicit_positions_with_cache_match_start(gen):
    m = make("head")
    ids = torch.randint(0, 90, (1, 10), generator=gen)
    c1, c2 = KVCache(), KVCache()
    m(ids, cache=c1)
    m(ids, cache=c2)
    a = m(ids[:, 6:], cache=c1, start=6).logits
    b = m(ids[:, 6:], cache=c2, start=6, position_ids=torch.arange(6, 10)[None]).logits
    assert torch.equal(a, b)


def test_block_noise_one_t_per_block(gen):
    ans = torch.randint(0, 90, (64, 32))
    am = torch.ones_like(ans, dtype=torch.bool)
    am[:, -3:] = False
    noisy, masked, p = block_noise(ans, 8, mask_id=96, generator=gen, answer_mask=am)
    assert torch.equal(noisy == 96, masked) and not masked[:, -3:].any()
    assert torch.equal(noisy[~masked], ans[~masked])
    blocks = p.view(64, 4, 8)
    assert torch.equal(blocks, blocks[:, :, :1].expand(-1, -1, 8))  # one t per block
    assert blocks[:, :, 0].std(1).mean() > 0.1  # ... independent across blocks
    # the masked fraction follows t
    hi, lo = p > 0.8, p < 0.2
    assert masked[hi & am].float().mean() > 0.7 and masked[lo & am].float().mean() < 0.3
