"""PSNR, SSIM and the CLIP score from torchmetrics give the numbers of catlab's earlier hand-written versions."""

import math
import string

import pytest
import torch
import torch.nn.functional as F

from catlab.metrics import psnr, ssim
from catlab.registry import metrics

TOL = 1e-4


# --- the hand-written versions the results so far were computed with, kept as the reference ---------------------


def psnr_reference(images, reference, max_value=1.0):
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(max_value**2 / mse)


def _gaussian(size, sigma):
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_reference(images, reference, window=11, sigma=1.5, max_value=1.0):
    x, y = images.float(), reference.float()
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    g = _gaussian(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def clip_score_reference(model, processor, images, prompts):
    # the earlier formula; with transformers >= 5 ``get_*_features`` return an output whose
    # ``pooler_output`` is the projected embedding, so that is unwrapped first
    def emb(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    pixels = [(img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy() for img in images]
    inputs = processor(text=prompts, images=pixels, return_tensors="pt", padding=True, truncation=True)
    img = F.normalize(emb(model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
    txt = F.normalize(
        emb(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])), dim=-1
    )
    return 100 * (img * txt).sum(-1).clamp(min=0)


# --- image pairs ------------------------------------------------------------------------------------------------


def _pairs(size, low, seed=0):
    """Independent pairs, slightly and strongly perturbed pairs, and a smooth pair, all within [low, 1]."""
    g = torch.Generator().manual_seed(seed)
    span = 1 - low
    a = torch.rand(8, 3, size, size, generator=g) * span + low
    b = torch.rand(8, 3, size, size, generator=g) * span + low
    noise = torch.randn(8, 3, size, size, generator=g)
    b[2:4] = (a[2:4] + 0.01 * noise[2:4]).clamp(low, 1)
    b[4:6] = (a[4:6] + 0.2 * noise[4:6]).clamp(low, 1)
    smooth = F.interpolate(torch.rand(2, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    a[6:] = smooth * span + low
    b[6:] = (a[6:] + 0.05 * noise[6:]).clamp(low, 1)
    return a, b


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("low", [-1.0, 0.0])
def test_psnr_and_ssim_match_the_hand_written_versions(size, low):
    a, b = _pairs(size, low, seed=size + int(low))
    new_p, old_p = psnr(a, b), psnr_reference(a, b)
    new_s, old_s = ssim(a, b), ssim_reference(a, b)
    assert new_p.shape == new_s.shape == (8,)
    assert (new_p - old_p).abs().max().item() < TOL
    assert (new_s - old_s).abs().max().item() < TOL
    # the registered metrics, called as the harness calls them
    p = metrics.build("psnr")(a, b, ["x"] * 8, [None] * 8)
    s = metrics.build("ssim")(a, b, ["x"] * 8, [None] * 8)
    assert (p - old_p.clamp(max=100.0)).abs().max().item() < TOL
    assert (s - old_s).abs().max().item() < TOL


def test_identical_images_and_known_answers():
    a = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.isinf(psnr(a, a)).all() and torch.isinf(psnr_reference(a, a)).all()
    assert metrics.build("psnr")(a, a, ["x", "y"], None).tolist() == [100.0, 100.0]
    assert torch.allclose(ssim(a, a), torch.ones(2))
    assert psnr(torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.1)).item() == pytest.approx(20.0, abs=TOL)


def test_ssim_refuses_a_window_that_torchmetrics_cannot_build():
    a = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="window"):
        ssim(a, a, window=7)
    with pytest.raises(ValueError, match="smaller"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_lpips_keeps_its_notice_without_the_lpips_package():
    m = metrics.build("lpips")
    try:
        import lpips  # noqa: F401
    except ImportError:
        reason = m.unavailable({})
        assert reason.startswith("lpips:") and "\n" not in reason
    else:
        assert m.unavailable({}) is None


# --- CLIP score on a tiny, randomly initialised CLIP saved to a folder ------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    torch.manual_seed(0)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab = {t: i for i, t in enumerate([bos, eos, *string.ascii_lowercase, *string.digits, " ", ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.post_processor = TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, 0), (eos, 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos, model_max_length=24
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=24,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_loads_a_local_folder_and_scores_each_image(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    m = metrics.build({"name": "clip_score", "backbone": str(tiny_clip)})
    assert not m.needs_reference and m.backbone == str(tiny_clip)
    assert m.unavailable({}) is None
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 48, 40, generator=g)
    images[0] = F.interpolate(torch.rand(1, 3, 3, 3, generator=g), size=(48, 40), mode="bilinear")[0]
    prompts = [
        "a red circle",
        "a blue square",
        "a green star on a white ground, drawn small and off centre",
        "two yellow triangles",
    ]  # the third is longer than the text encoder's 24 positions
    scores = m(images, None, prompts, [None] * 4)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 100)).all()
    with torch.no_grad():
        model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
        old = clip_score_reference(model, processor, images, prompts)
    assert (scores - old).abs().max().item() < TOL


def test_clip_score_without_weights_is_skipped_with_a_one_line_notice(tmp_path):
    m = metrics.build({"name": "clip_score", "backbone": str(tmp_path / "no_such_clip")})
    reason = m.unavailable({})
    assert reason.startswith("clip_score: weights of") and "\n" not in reason


def test_flat_images_give_the_closed_form():
    """The one place the two part: a flat image, whose variance E[x²] − E[x]² rounds below zero in float32.

    The earlier version kept that negative variance (-1.8e-7 at 0.6), which next to C2 = 9e-4 lifted SSIM
    by 2e-4; torchmetrics clamps variances at 0 and gives the closed form. Images with any texture do not
    round that way (the random pairs above, and the embedded model's images, agree to a few 1e-6).
    """
    a = torch.zeros(1, 3, 16, 16)
    assert psnr_reference(a, a + 0.1).item() == pytest.approx(20.0, abs=TOL)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)  # luminance term only: no variance, no covariance
    assert ssim(a + 0.5, a + 0.6).item() == pytest.approx(expected, abs=1e-6)
    assert ssim_reference(a + 0.5, a + 0.6).item() == pytest.approx(expected, abs=1e-3)
    assert not math.isnan(ssim(a, a + 0.1).item())


def test_fid_on_a_tiny_local_clip(tiny_clip):
    """The FID loading path on a randomly initialised CLIP saved to a folder: 0 for a set against itself,
    more for a set that differs, more still for one that differs more."""
    m = metrics.build({"name": "fid", "feature": "clip", "backbone": str(tiny_clip)})
    assert m.set_level and not m.higher_is_better and m.unavailable({}) is None
    g = torch.Generator().manual_seed(2)
    reference = torch.rand(12, 3, 32, 32, generator=g)
    near = (reference + 0.05 * torch.randn(12, 3, 32, 32, generator=g)).clamp(0, 1)
    far = torch.rand(12, 3, 32, 32, generator=g) * 0.3
    same = m.compute(reference, reference)
    assert abs(same) < 1e-3
    assert same < m.compute(near, reference) < m.compute(far, reference)


def test_fid_without_weights_is_skipped_with_a_one_line_notice(tmp_path):
    for spec in (
        {"name": "fid", "weights": str(tmp_path / "no_inception.pth")},
        {"name": "fid", "feature": "clip", "backbone": str(tmp_path / "no_clip")},
    ):
        reason = metrics.build(spec).unavailable({})
        assert reason.startswith("fid: ") and "\n" not in reason
    with pytest.raises(ValueError, match="feature must be"):
        metrics.build({"name": "fid", "feature": "dino"})


def test_fid_column_end_to_end_in_an_evaluation(tiny_clip, tmp_path):
    """``metrics=[psnr, {name: fid, ...}]``: the evaluation computes FID per strategy from its saved images."""
    from hydra import compose, initialize_config_dir

    from catlab.evaluate import run
    from tests.conftest import ROOT

    overrides = [
        "model=tiny_sd3",
        "model.num_layers=1",
        "model.height=16",
        "model.width=16",
        "sampler.num_steps=4",
        "+strategy_defaults.start_step=2",
        "strategies=[full,random]",
        "batch_size=3",
        "prompts.prompts=[a red circle,a blue square,a green star]",
        f"metrics=[psnr,{{name:fid,feature:clip,backbone:'{tiny_clip}'}}]",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    (tmp_path / "out").mkdir()
    rows = run(cfg, tmp_path / "out")
    assert "fid" not in rows[0] and rows[1]["fid"] > 0
    assert (tmp_path / "out" / "results.md").read_text().splitlines()[2].endswith("| SSIM | FID |")  # under the title
