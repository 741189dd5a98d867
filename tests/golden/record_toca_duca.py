"""Record ``toca_pixart_authors.pt`` and ``duca_authors.pt``: the authors' own ToCa / DuCa cache functions run
on synthetic CPU inputs (``tests/test_toca.py``, ``tests/test_duca.py`` compare catlab with them).

    python tests/golden/record_toca_duca.py AUTHORS_DIR

``AUTHORS_DIR`` holds the folders ``PixArt-alpha-ToCa`` (from ``Shenyi-Z/ToCa``), ``DuCa-DiT`` and
``DuCa-PixArt-alpha`` (from ``Shenyi-Z/DuCa``), each with its ``cache_functions``. Their packages import
``xformers`` and ``timm`` for attention code these functions do not use: empty stand-ins are put on the path.
"""

import importlib
import sys
import tempfile
from pathlib import Path

import torch

AUTHORS = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
OUT = Path(__file__).resolve().parent


def _stand_ins() -> Path:
    root = Path(tempfile.mkdtemp())
    for folder in ("xformers/ops/fmha", "timm/layers"):
        (root / folder).mkdir(parents=True)
    for init in ("xformers", "xformers/ops", "xformers/ops/fmha", "timm"):
        (root / init / "__init__.py").write_text("")
    (root / "xformers/ops/fmha/attn_bias.py").write_text("BlockDiagonalMask = object\n")
    (root / "timm/layers/__init__.py").write_text("def use_fused_attn():\n    return True\n")
    return root


sys.path.insert(0, str(_stand_ins()))


def load(root: str, pkg: str):
    """Import the package ``pkg`` (a cache_functions folder) with ``root`` on the path, fresh."""
    for name in [m for m in sys.modules if m == "cache_functions" or m.startswith("cache_functions.")]:
        del sys.modules[name]
    for name in [m for m in sys.modules if m.startswith("diffusion")]:
        del sys.modules[name]
    sys.path.insert(0, str(AUTHORS / root))
    try:
        return importlib.import_module(pkg)
    finally:
        sys.path.pop(0)


def toca_pixart() -> dict:
    cf = load("PixArt-alpha-ToCa", "diffusion.model.cache_functions")
    from diffusion.model.cache_functions.cache_cutfresh import local_selection_with_bonus
    from diffusion.model.cache_functions.force_scheduler import force_scheduler
    from diffusion.model.cache_functions.fresh_ratio_scheduler import fresh_ratio_scheduler
    from diffusion.model.cache_functions.global_force_fresh import global_force_fresh
    from diffusion.model.cache_functions.scores import attn_score

    out = {}
    # 1. the fresh-ratio schedule over (steps, layers, modules)
    n = 20
    kw = dict(cache_type="attention", ratio_scheduler="ToCa", fresh_ratio=0.3, fresh_threshold=3,
              force_fresh="global", soft_fresh_weight=0.25)
    cache_dic, current = cf.cache_init(kw, n)
    ratios = torch.zeros(n, 28, 2, dtype=torch.float64)
    for i in range(n):
        for layer in range(28):
            for m, module in enumerate(("cross-attn", "mlp")):
                current.update(step=i, layer=layer, module=module)
                ratios[i, layer, m] = float(fresh_ratio_scheduler(cache_dic, current))
    out["ratios"] = ratios
    # 2. forced full steps: global_force_fresh at each step, force_scheduler (in force_init) at full ones
    for threshold, steps in ((3, 20), (4, 20), (3, 50), (5, 28)):
        cache_dic, current = cf.cache_init({**kw, "fresh_threshold": threshold}, steps)
        full = []
        for i in range(steps):
            current.update(step=i, layer=0, module="mlp")
            f = bool(global_force_fresh(cache_dic, current))
            if f:
                force_scheduler(cache_dic, current)
            full.append(f)
        out[f"full_t{threshold}_n{steps}"] = torch.tensor(full)
    # 3. the spatial bonus on random scores
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 64, generator=g)
    out["bonus_in_8x8"] = s
    out["bonus_out_8x8_r04_g4"] = local_selection_with_bonus(s.clone(), 0.4, 4)
    s = torch.rand(2, 256, generator=g)
    out["bonus_in_16x16"] = s
    out["bonus_out_16x16_r08_g2"] = local_selection_with_bonus(s.clone(), 0.8, 2)
    # 4. cross-attention entropy score and a run of cache_cutfresh on synthetic maps (B = 2, 2 branches)
    b, num, text = 2, 64, 8
    cmaps = torch.rand(2 * b, num, text, generator=g).softmax(-1)
    cache_dic, current = cf.cache_init(kw, n)
    cache_dic["cross_attn_map"][-1][0] = cmaps.clone()
    current.update(step=1, layer=0, module="cross-attn")
    out["cmaps"] = cmaps
    out["entropy_score"] = attn_score(cache_dic, current)
    tokens = torch.zeros(2 * b, num, 4)
    for module in ("cross-attn", "mlp"):
        current.update(step=0, layer=0, module=module)
        cf.force_init(cache_dic, current, tokens)
    fresh_seq, counters = [], []
    for i in (1, 2, 4, 5):
        for module in ("cross-attn", "mlp"):
            current.update(step=i, layer=0, module=module)
            idx, _ = cf.cache_cutfresh(cache_dic, tokens, current)
            fresh_seq.append(idx.clone())
            counters.append(cache_dic["cache_index"][-1][0][module].clone())
    out["cut_fresh"] = fresh_seq
    out["cut_counters"] = counters
    out["cut_n"] = torch.tensor(n)
    return out


def duca() -> dict:
    out = {}
    cf = load("DuCa-DiT", "cache_functions")
    from cache_functions.cal_type import cal_type
    from cache_functions.force_scheduler import force_scheduler
    from cache_functions.fresh_ratio_scheduler import fresh_ratio_scheduler

    # DiT: the step index counts down; cal_type runs per layer, force_init (force_scheduler) per layer at full
    n, layers = 50, 28
    kw = dict(cache_type="random", ratio_scheduler="ToCa", fresh_ratio=0.05, fresh_threshold=3,
              force_fresh="global", soft_fresh_weight=0.25, test_FLOPs=False)
    cache_dic, current = cf.cache_init(kw, n)
    types = []
    for i in reversed(range(n)):
        row = []
        for layer in range(layers):
            current.update(step=i, layer=layer)
            cal_type(cache_dic, current)
            if current["type"] == "full":
                force_scheduler(cache_dic, current)
            row.append(("full", "ToCa", "aggressive").index(current["type"]))
        types.append(row)
    out["dit_types"] = torch.tensor(types)  # (steps in sampling order, layers)
    ratios = torch.zeros(n, layers, dtype=torch.float64)
    for i in range(n):
        for layer in range(layers):
            current.update(step=i, layer=layer, module="mlp")
            ratios[i, layer] = float(fresh_ratio_scheduler(cache_dic, current))
    out["dit_ratios_mlp"] = ratios  # indexed by the authors' step index i
    current.update(step=10, layer=0, module="attn")
    out["dit_ratio_attn"] = torch.tensor(float(fresh_ratio_scheduler(cache_dic, current)))

    cf = load("DuCa-PixArt-alpha", "diffusion.model.cache_functions")
    from diffusion.model.cache_functions.cal_type import cal_type as cal_type_px
    from diffusion.model.cache_functions.force_scheduler import force_scheduler as force_px

    n = 20
    kw = dict(cache_type="random", ratio_scheduler="ToCa", fresh_ratio=0.75, fresh_threshold=3,
              force_fresh="global", soft_fresh_weight=0.25, test_FLOPs=False)
    for threshold in (3, 4):
        cache_dic, current = cf.cache_init({**kw, "fresh_threshold": threshold}, n)
        types = []
        for i in range(n):
            current.update(step=i, layer=0)
            cal_type_px(cache_dic, current)
            if current["type"] == "full":
                force_px(cache_dic, current)
            types.append(("full", "ToCa", "aggressive").index(current["type"]))
        out[f"pixart_types_t{threshold}"] = torch.tensor(types)
    return out


if __name__ == "__main__":
    torch.save(toca_pixart(), OUT / "toca_pixart_authors.pt")
    torch.save(duca(), OUT / "duca_authors.pt")
    for f in ("toca_pixart_authors.pt", "duca_authors.pt"):
        print(f, (OUT / f).stat().st_size)
