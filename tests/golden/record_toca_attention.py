"""Record ``toca_attention_authors.pt``: ToCa's s1 score (the attention a token receives) as the authors' own
FLUX and DiT functions compute it on synthetic CPU inputs (``tests/test_toca_attention.py`` compares catlab).

    python tests/golden/record_toca_attention.py AUTHORS_DIR

``AUTHORS_DIR`` holds ``flux-ToCa`` and ``DiT-ToCa`` from ``Shenyi-Z/ToCa``. Their FLUX attention module
imports ``einops`` (needed on the path); the DiT attention module imports ``timm`` for its fused-attention
switch, which gets an empty stand-in. Recorded:

* FLUX: ``dot_product_attention`` (its map averaged over heads and queries) on a joint sequence of 5 text and
  16 image tokens, then ``score_evaluate`` with ``cache_type='attention'`` for a double-stream block's image
  MLP (the map's image columns, L2-normalised, plus s3 from a given cache counter) and its top 4;
* DiT: the ``Attention`` module's map (``cache_type='attention'``), then ``attn_score``.
"""

import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch

AUTHORS = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
OUT = Path(__file__).resolve().parent


def _module(name: str, path: Path, package: str | None = None):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if package:
        module.__package__ = package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _package(name: str, folder: Path, *members: str):
    """``folder``'s modules ``members`` under the package ``name`` (its ``__init__`` imports more than these)."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(folder)]
    sys.modules[name] = pkg
    return [_module(f"{name}.{m}", folder / f"{m}.py", name) for m in members]


def flux() -> dict:
    math_ = _module("flux_math", AUTHORS / "flux-ToCa/src/flux/math.py")
    scores, evaluate = _package(
        "flux_cf", AUTHORS / "flux-ToCa/src/flux/modules/cache_functions", "scores", "score_evaluate"
    )
    g = torch.Generator().manual_seed(0)
    b, h, text, n, d = 2, 3, 5, 16, 8
    q, k, v = (torch.randn(b, h, text + n, d, generator=g) for _ in range(3))
    _, total = math_.dot_product_attention(q, k, v)  # (B, S): mean over heads, then over queries
    counter = torch.randint(0, 4, (b, n), generator=g, dtype=torch.int32)
    current = {"stream": "double_stream", "layer": 0, "module": "img_mlp", "step": 3}
    cache_dic = {
        "cache_type": "attention",
        "force_fresh": "global",
        "fresh_threshold": 4,
        "soft_fresh_weight": 0.25,
        "attn_map": {-1: {"double_stream": {0: {"total": total, "img_mlp": total[:, text:]}}}},
        "cache_index": {-1: {0: {"img_mlp": counter}}},
    }
    score = evaluate.score_evaluate(cache_dic, torch.zeros(b, n, d), current)
    return {
        "q": q,
        "k": k,
        "v": v,
        "text": text,
        "total": total,
        "counter": counter,
        "fresh_threshold": 4,
        "soft_fresh_weight": 0.25,
        "score": score,
        "top4": score.argsort(dim=-1, descending=True)[:, :4],
    }


def dit() -> dict:
    stub = Path(tempfile.mkdtemp())
    (stub / "timm/layers").mkdir(parents=True)
    (stub / "timm/__init__.py").write_text("")
    (stub / "timm/layers/__init__.py").write_text("def use_fused_attn():\n    return True\n")
    sys.path.insert(0, str(stub))
    attention, scores = _package("dit_cf", AUTHORS / "DiT-ToCa/cache_functions", "attention", "scores")
    torch.manual_seed(0)
    module = attention.Attention(24, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(1))
    cache_dic, current = {"cache_type": "attention", "flops": 0, "cache": {-1: {0: {}}}}, {"layer": 0}
    with torch.no_grad():
        _, attn_map = module(x, cache_dic, current)
    cache_dic["attn_map"] = {-1: {0: attn_map}}
    qkv = module.qkv(x).reshape(2, 16, 3, 3, 8).permute(2, 0, 3, 1, 4)
    return {
        "q": qkv[0].detach(),
        "k": qkv[1].detach(),
        "attn_map": attn_map,
        "score": scores.attn_score(cache_dic, current),
    }


if __name__ == "__main__":
    torch.save({"flux": flux(), "dit": dit()}, OUT / "toca_attention_authors.pt")
    print(f"wrote {OUT / 'toca_attention_authors.pt'}")
