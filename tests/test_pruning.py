"""Pruned execution: alpha = 1 is the stock model; pruned outputs match a masked reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catlab.pruning import TokenPruner, UnsupportedModelError, family_of
from catlab.pruning.families import patchify
from catlab.sampler import SamplerConfig, sample
from catlab.selection.simple import Full, Random

TOL = 1e-5


def _inputs(adapter, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = adapter.encode([f"prompt {i} word{i}" for i in range(batch)], guidance=True)
    h, w = adapter.latent_size
    x = torch.randn(batch * cond.groups, adapter.latent_channels, h, w, generator=g)
    return x, cond


def _forward(adapter, x, cond, t=500.0):
    return adapter.predict(x, torch.tensor(t), cond)


@torch.no_grad()
def test_alpha_one_reproduces_the_stock_model(adapter):
    x, cond = _inputs(adapter)
    stock = _forward(adapter, x, cond)
    pruner = TokenPruner(adapter.transformer).attach()
    assert torch.equal(_forward(adapter, x, cond), stock)  # a full step is the stock forward
    n = adapter.grid[0] * adapter.grid[1]
    perm = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    pruner.set_indices(perm, rows=x.shape[0])  # every token, in a shuffled order
    torch.testing.assert_close(_forward(adapter, x, cond), stock, atol=TOL, rtol=0)
    pruner.detach()
    assert torch.equal(_forward(adapter, x, cond), stock)


def test_alpha_one_through_the_sampler(adapter):
    cfg = SamplerConfig(num_steps=5, progress=False, check_indices=True)
    full = sample(adapter, Full(), ["a red circle", "a blue square"], [0, 1], cfg)
    pruned = sample(adapter, Random(alpha=1.0, start_step=1), ["a red circle", "a blue square"], [0, 1], cfg)
    torch.testing.assert_close(pruned.latents, full.latents, atol=TOL, rtol=0)
    assert [s.kept for s in pruned.trace.steps] == [pruned.trace.num_tokens] * 5


class _ReplaceCachedKV:
    """Reference: an unpruned attention whose unselected tokens' K/V are the cached ones."""

    def __init__(self, key_cache, value_cache, selected):
        self.kc, self.vc, self.keep = key_cache, value_cache, selected[:, None, :, None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, n, _ = hidden_states.shape

        def heads(t):
            return t.view(rows, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        k, v = torch.where(self.keep, k, self.kc), torch.where(self.keep, v, self.vc)
        joint = encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None
        if joint:
            e = encoder_hidden_states
            cq, ck, cv = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, -1, q.shape[1] * q.shape[-1])
        image = attn.to_out[0](out[:, :n])
        if not joint:
            return image
        context = out[:, n:]
        return image, (context if attn.context_pre_only else attn.to_add_out(context))


@torch.no_grad()
def test_selected_outputs_match_a_masked_reference(adapter):
    x0, cond = _inputs(adapter, seed=0)
    x1 = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    n = adapter.grid[0] * adapter.grid[1]
    k = n // 3
    idx = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(10 + s))[:k] for s in range(2)])

    pruner = TokenPruner(adapter.transformer).attach()
    first = patchify(_forward(adapter, x0, cond, t=600.0), adapter.patch_size)
    caches = {p.name: (p.key_cache.clone(), p.value_cache.clone()) for p in pruner.processors}
    pruner.set_indices(idx, rows=x0.shape[0])
    pruned = patchify(_forward(adapter, x1, cond, t=500.0), adapter.patch_size)
    pruner.detach()

    rows_idx = pruner_rows = idx.repeat(x0.shape[0] // 2, 1)
    selected = torch.zeros(x0.shape[0], n, dtype=torch.bool).scatter(1, pruner_rows, True)
    blocks = adapter.transformer.transformer_blocks
    originals = {}
    for name, (kc, vc) in caches.items():
        _, layer, attr = name.split(".")
        attn = getattr(blocks[int(layer)], attr)
        originals[attn] = attn.processor
        attn.processor = _ReplaceCachedKV(kc, vc, selected)
    try:
        reference = patchify(_forward(adapter, x1, cond, t=500.0), adapter.patch_size)
    finally:
        for attn, proc in originals.items():
            attn.processor = proc

    gather = rows_idx[..., None].expand(-1, -1, pruned.shape[-1])
    torch.testing.assert_close(pruned.gather(1, gather), reference.gather(1, gather), atol=TOL, rtol=0)
    # the unselected tokens keep the previous step's output
    torch.testing.assert_close(pruned[~selected], first[~selected], atol=0, rtol=0)


def test_per_sample_indices_shared_by_cfg_branches(monkeypatch):
    from tests.conftest import tiny_sd3

    adapter = tiny_sd3()
    seen = []
    original = TokenPruner.set_indices

    def spy(self, indices, rows=None):
        original(self, indices, rows)
        if self.row_indices is not None:
            seen.append(self.row_indices.clone())

    monkeypatch.setattr(TokenPruner, "set_indices", spy)
    sample(
        adapter,
        Random(alpha=0.3, start_step=2),
        ["a red circle", "a blue square"],
        [0, 1],
        SamplerConfig(num_steps=4, progress=False, check_indices=True),
    )
    assert len(seen) == 2
    for rows in seen:
        assert rows.shape[0] == 4  # 2 samples x 2 CFG branches
        assert torch.equal(rows[:2], rows[2:])  # each sample's branches share indices
        assert not torch.equal(rows[0], rows[1])  # different samples, different indices


def test_unsupported_models_are_named():
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
    )
    with pytest.raises(UnsupportedModelError, match="cannot prune a UNet2DModel") as err:
        family_of(unet)
    for family in ("SD3Transformer2DModel with JointTransformerBlock", "PixArtTransformer2DModel", "DiTTransformer2D"):
        assert family in str(err.value)


def test_unsupported_block_is_named():
    from tests.conftest import tiny_sd3

    adapter = tiny_sd3()
    adapter.transformer.transformer_blocks[1] = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="block 1 is a Identity.*JointTransformerBlock"):
        family_of(adapter.transformer)
