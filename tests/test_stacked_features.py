"""What users stack on a pruned stock pipeline: LoRA, int8 weights, torch.compile, offloading, call options.

Each test is a cell of the compatibility matrix in docs/pipelines.md: a stacked feature (row) under one of three
columns -- token pruning (``cat``), a forecast schedule (``budget_schedule`` with ``reuse=taylor``) and a step cache
(``taylorseer`` under ``cat``) -- on the tiny offline pipelines of :mod:`catlab.testing.tiny_pipelines`. Every cell
checks the same four things (:func:`check_cell`): with nothing dropped (α = 1, a pattern of full steps, a cache
that computes every step) the pipeline gives the stock pipeline's output; pruned, it is deterministic and differs;
its MACs per step are fewer than a full step's at some step; and ``disable_pruning`` gives the stock output back
bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.assembly import StepReuse
from catlab.pruning.state import hook_names
from catlab.registry import reuses, selectors, stepcaches
from catlab.testing.tiny_pipelines import (
    flux_pipeline,
    pixart_sigma_pipeline,
    qwen_image_pipeline,
    sd3_pipeline,
    sd35_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
COLUMNS = ("cat", "budget_schedule", "step_cache")
#: builder, what every call passes, what enable_pruning is given
PIPELINES = {
    "sd3": (sd3_pipeline, dict(max_sequence_length=32), {}),
    "sd35": (sd35_pipeline, dict(max_sequence_length=32), {}),
    "pixart_sigma": (
        pixart_sigma_pipeline,
        dict(max_sequence_length=32, use_resolution_binning=False, guidance_scale=4.5),
        dict(guidance_scale=4.5),
    ),
    "flux": (flux_pipeline, dict(max_sequence_length=32), {}),
    "qwen_image": (qwen_image_pipeline, dict(max_sequence_length=32, true_cfg_scale=1.0), {}),
}


def parts(column: str, identity: bool = False):
    """The selector and reuse parts of a column; ``identity``: the same parts configured to drop nothing."""
    cat = selectors.build({"name": "cat", "alpha": 1.0 if identity else 0.5, "start_step": 2})
    if column == "cat":
        return cat, None
    if column == "budget_schedule":
        pattern = [1.0] if identity else [1.0, 0.5, 0.0]
        policy = selectors.build({"name": "budget_schedule", "start_step": 2, "inner": "cat", "pattern": pattern})
        return policy, StepReuse(rule=reuses.build("taylor"))
    cache = {"name": "taylorseer", "cache_interval": 2, "start_step": STEPS if identity else 2}
    return cat, StepReuse(rule=reuses.build("taylor"), step_cache=stepcaches.build(cache))


def caller(name: str, **fixed):
    """``call(pipe, **kw)``: one seeded 64x64, 5-step call of pipeline ``name`` as a list of numpy arrays."""
    defaults = {**PIPELINES[name][1], **fixed}

    def call(pipe, prompt="a red circle", size=64, **kw):
        kw = {"generator": torch.Generator().manual_seed(0), "output_type": "np", **defaults, **kw}
        images = pipe(prompt, num_inference_steps=STEPS, height=size, width=size, **kw).images
        return [images.numpy() if torch.is_tensor(images) else np.asarray(images)]

    return call


def check_cell(pipe, name: str, column: str, call, atol: float = 1e-5, stock=None, count_macs=False) -> list[int]:
    """The four checks of a cell (module docstring); returns the pruned generation's MACs per step."""
    extra = PIPELINES[name][2]
    stock = call(pipe) if stock is None else stock
    before = installed_hooks(pipe)
    policy, reuse = parts(column, identity=True)
    enable_pruning(pipe, policy, reuse=reuse, count_macs=count_macs, **extra)
    for got, want in zip(call(pipe), stock, strict=True):
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    full = pruning_macs(pipe)
    policy, reuse = parts(column)
    enable_pruning(pipe, policy, reuse=reuse, count_macs=count_macs, **extra)
    first = call(pipe)
    macs = pruning_macs(pipe)
    second = call(pipe)
    disable_pruning(pipe)
    assert all(np.array_equal(a, b) for a, b in zip(first, second)), "pruned output not deterministic"
    assert any(not np.allclose(a, b, atol=1e-4) for a, b in zip(first, stock)), "pruning changed nothing"
    assert len(macs) == len(full) == STEPS and all(m <= f for m, f in zip(macs, full)) and sum(macs) < sum(full)
    assert all(np.array_equal(a, b) for a, b in zip(call(pipe), stock)), "disabled: not the stock pipeline"
    assert installed_hooks(pipe) == before, "a hook outlived disable_pruning"
    return macs


def installed_hooks(pipe) -> list[tuple[str, str]]:
    """(module, hook) for every diffusers hook on the transformer: catlab's, a step cache's, group offloading's."""
    return sorted((n, h) for n, m in pipe.transformer.named_modules() for h in hook_names(m))


# -- the pipelines themselves --------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_columns(name, column):
    check_cell(PIPELINES[name][0](), name, column, caller(name))


# -- LoRA (peft) -------------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_RANK = 4


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    """A tiny LoRA per family, trained by nobody: peft's random init of both factors, saved with the pipeline
    class's own ``save_lora_weights`` (one safetensors file), as a LoRA from a hub would be."""
    peft = pytest.importorskip("peft", reason="LoRA needs peft: pip install peft (catlab's dev extra has it)")
    from peft.utils import get_peft_model_state_dict

    folders = {}
    for name in ("sd3", "flux"):
        pipe = PIPELINES[name][0]()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            config = peft.LoraConfig(
                r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS, init_lora_weights=False
            )
            pipe.transformer.add_adapter(config)
        folders[name] = tmp_path_factory.mktemp(f"lora_{name}")
        layers = get_peft_model_state_dict(pipe.transformer)
        type(pipe).save_lora_weights(folders[name], transformer_lora_layers=layers)
    return folders


def _with_lora(name, folders, fused: bool):
    pipe = PIPELINES[name][0]()
    pipe.load_lora_weights(folders[name], adapter_name="tiny")
    if fused:
        pipe.fuse_lora()
    return pipe


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora(name, fused, column, lora_folders):
    """Pruning gathers the tokens before peft's wrapped linears, which then compute the k tokens like any
    linear: α = 1 equals the LoRA pipeline, the LoRA changes the output, fusing changes it by rounding only."""
    call = caller(name)
    plain = call(PIPELINES[name][0]())
    pipe = _with_lora(name, lora_folders, fused)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__module__.startswith("peft")
    stock = call(pipe)
    assert not np.allclose(stock[0], plain[0], atol=1e-3), "the LoRA changed nothing"
    check_cell(pipe, name, column, call, stock=stock)
    if fused:
        pipe.unfuse_lora()
        np.testing.assert_allclose(call(pipe)[0], call(_with_lora(name, lora_folders, False))[0], atol=1e-5, rtol=0)


def _lora_macs(name: str, kept: int) -> int:
    """The LoRA's MACs in one forward, by hand: r (in + out) per token through each adapted linear (all 32 -> 32)
    -- SD3: 4 linears x 3 blocks on the image tokens of 2 rows (guidance); FLUX: 4 x 2 dual-stream blocks on the
    image tokens, 3 (no to_out) x 2 single-stream blocks on image + 32 text tokens, 1 row."""
    per_token = LORA_RANK * (32 + 32)
    if name == "sd3":
        return per_token * 4 * 3 * 2 * kept
    return per_token * (4 * 2 * kept + 3 * 2 * (kept + 32))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_macs_are_counted_unfused_and_not_fused(name, lora_folders):
    """Both MAC counters (``count_macs``: counted as they run; the family's formula) add an unfused LoRA's two
    low-rank matmuls per adapted linear, on the tokens it computes; a fused LoRA adds nothing."""
    call, policy = caller(name), lambda: selectors.build({"name": "sequential", "alpha": 0.5, "start_step": 2})
    base = PIPELINES[name][0]()
    enable_pruning(base, policy())
    call(base)
    plain = pruning_macs(base)
    for fused in (False, True):
        pipe = _with_lora(name, lora_folders, fused)
        for count in (True, False):
            enable_pruning(pipe, policy(), count_macs=count)
            call(pipe)
            macs = pruning_macs(pipe)
            extra = [0] * STEPS if fused else [_lora_macs(name, 256)] * 2 + [_lora_macs(name, 128)] * 3
            assert [m - p for m, p in zip(macs, plain)] == extra, (fused, count)
            disable_pruning(pipe)


# -- int8 weight-only quantization (torchao) -----------------------------------------------------------------------


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("name", ["sd3", "flux", "pixart_sigma"])
def test_int8_weight_only(name, column):
    """torchao's int8 weight-only quantization (runs on a CPU): the weights are int8 with a scale per row,
    dequantized at each matmul, the activations stay fp32. A pruned step computes the k gathered tokens through
    the same dequantized weights, so α = 1 equals the quantized stock pipeline to fp32's 1e-5."""
    pytest.importorskip("torchao", reason="int8 weights need torchao: pip install torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    call = caller(name)
    pipe = PIPELINES[name][0]()
    full_precision = call(pipe)
    quantize_(pipe.transformer, Int8WeightOnlyConfig())
    linear = next(m for m in pipe.transformer.transformer_blocks[0].modules() if isinstance(m, torch.nn.Linear))
    assert type(linear.weight).__module__.startswith("torchao"), type(linear.weight)  # an int8 tensor subclass
    stock = call(pipe)
    assert not np.array_equal(stock[0], full_precision[0]), "quantization changed nothing"
    macs = check_cell(pipe, name, column, call, stock=stock, count_macs=True)
    # counted as they ran (nn.Linear hooks see the quantized linears): the formula's count, as in full precision
    if column == "cat":
        enable_pruning(pipe, parts("cat")[0], **PIPELINES[name][2])
        call(pipe)
        assert pruning_macs(pipe)[:2] == macs[:2] and pruning_macs(pipe)[3:] == macs[3:]
        disable_pruning(pipe)


# -- torch.compile -----------------------------------------------------------------------------------------------


def _graph_counter():
    """A ``torch.compile`` backend that runs each graph eagerly and counts the graphs it was given."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


@pytest.mark.slow
@pytest.mark.parametrize("column", ["cat", "budget_schedule"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_compiled_pruned_transformer_compiles_once_per_shape(name, column):
    """``compile_pruned`` (each block compiled in place, the hooks eager): the first generation compiles a graph
    per block kind, full and pruned; a second prompt of the same shape compiles nothing (no recompile, dynamo's
    own counter unchanged) and gives the eager pruned output."""
    from torch._dynamo.utils import counters

    from catlab.pruning import compile_pruned, uncompile

    call = caller(name)
    pipe = PIPELINES[name][0]()
    stock = call(pipe)
    policy, reuse = parts(column)
    enable_pruning(pipe, policy, reuse=reuse)
    eager = [call(pipe), call(pipe, prompt="a blue square")]
    torch._dynamo.reset()
    counters.clear()
    backend, graphs = _graph_counter()
    try:
        compile_pruned(pipe, backend=backend)
        first = call(pipe)
        compiled, unique = len(graphs), counters["stats"]["unique_graphs"]
        second = call(pipe, prompt="a blue square")
        assert len(graphs) == compiled > 0 and counters["stats"]["unique_graphs"] == unique == compiled
        assert not counters["recompiles"]
        macs = pruning_macs(pipe)
        np.testing.assert_allclose(first[0], eager[0][0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(second[0], eager[1][0], atol=1e-5, rtol=0)
        assert np.array_equal(call(pipe)[0], first[0])  # deterministic
        assert max(macs) == macs[0] > min(macs)
        disable_pruning(pipe)
        policy, reuse = parts(column, identity=True)
        enable_pruning(pipe, policy, reuse=reuse)
        np.testing.assert_allclose(call(pipe)[0], stock[0], atol=1e-5, rtol=0)  # α = 1 under compile
        disable_pruning(pipe)
    finally:
        uncompile(pipe)
        torch._dynamo.reset()
    assert np.array_equal(call(pipe)[0], stock[0])


def test_compiled_blocks_and_a_step_cache_are_refused_in_one_line():
    """diffusers' TaylorSeer hook decides on the host, inside each block, whether to compute (a
    ``torch.compiler.disable``d function): a block cannot compile as one graph (dynamo raises ``Unsupported`` at
    the first call; with ``fullgraph=False`` it recompiles at every step). Both orders are refused before any call,
    nothing left installed."""
    from catlab.pruning import compile_pruned, uncompile

    pipe = sd3_pipeline()
    policy, reuse = parts("step_cache")
    enable_pruning(pipe, policy, reuse=reuse)
    with pytest.raises(ValueError, match="carry the step cache 'taylorseer'") as err:
        compile_pruned(pipe, backend=_graph_counter()[0])
    assert "\n" not in str(err.value)
    assert all(b._compiled_call_impl is None for b in pipe.transformer.transformer_blocks)
    disable_pruning(pipe)
    compile_pruned(pipe, backend=_graph_counter()[0])
    policy, reuse = parts("step_cache")
    with pytest.raises(ValueError, match="blocks are compiled") as err:
        enable_pruning(pipe, policy, reuse=reuse)
    assert "\n" not in str(err.value) and installed_hooks(pipe) == []
    uncompile(pipe)


# -- offloading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_model_cpu_offload(name, column):
    """``enable_model_cpu_offload(device="cpu")``: accelerate's hooks move each model to the device before its
    call (a no-op from CPU to CPU, but the hooks are there, around catlab's)."""
    pytest.importorskip("accelerate", reason="offloading needs accelerate: pip install accelerate")
    pipe = PIPELINES[name][0]()
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")
    check_cell(pipe, name, column, caller(name))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_pruning_enabled_before_model_cpu_offload(name):
    """The other order: pruning first, then offloading; a pipeline call ends by re-installing accelerate's hooks,
    which must keep catlab's hook in the call path while enabled and not bring it back once disabled."""
    pytest.importorskip("accelerate", reason="offloading needs accelerate: pip install accelerate")
    call = caller(name)
    pipe = PIPELINES[name][0]()
    stock = call(pipe)[0]
    enable_pruning(pipe, parts("cat")[0])
    pipe.enable_model_cpu_offload(device="cpu")
    runs = [call(pipe)[0] for _ in range(3)]
    disable_pruning(pipe)
    assert all(np.array_equal(r, runs[0]) for r in runs) and not np.allclose(runs[0], stock, atol=1e-4)
    assert all(np.array_equal(call(pipe)[0], stock) for _ in range(2))


def test_model_cpu_offload_without_an_accelerator_is_diffusers_refusal():
    pytest.importorskip("accelerate", reason="offloading needs accelerate: pip install accelerate")
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: the default device is it")
    with pytest.raises(RuntimeError, match="requires accelerator"):
        sd3_pipeline().enable_model_cpu_offload()


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_group_offload(name, column):
    """diffusers' group offloading (block level, one block per group; onload and offload device both the CPU):
    its hooks on each block run around the token gather."""
    pytest.importorskip("accelerate", reason="diffusers' group offloading needs accelerate: pip install accelerate")
    pipe = PIPELINES[name][0]()
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(
        onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
    )
    check_cell(pipe, name, column, caller(name))


# -- call options ------------------------------------------------------------------------------------------------


def _damp(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"] * 0.95}


OPTIONS = {
    "prompt_list": dict(prompt=["a red circle", "a blue square"]),
    "num_images_per_prompt": dict(num_images_per_prompt=2),
    "negative_prompt": dict(negative_prompt="blurry"),
    "output_type_latent": dict(output_type="latent"),
    "callback_on_step_end": dict(callback_on_step_end=_damp, callback_on_step_end_tensor_inputs=["latents"]),
    "size_change": None,
}
#: FLUX.1's true CFG: a negative prompt is only used with true_cfg_scale > 1 (a second transformer call per step)
FLUX_OPTIONS = {**OPTIONS, "negative_prompt": dict(negative_prompt="blurry", true_cfg_scale=2.0)}


def _option_caller(name, option):
    call = caller(name)
    kwargs = (FLUX_OPTIONS if name == "flux" else OPTIONS)[option]
    if kwargs is None:  # 64 px, then 32 px, on one pipeline
        return lambda pipe: call(pipe) + call(pipe, size=32)
    if option == "prompt_list":
        gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
        return lambda pipe: call(pipe, generator=gens(), **kwargs)
    return lambda pipe: call(pipe, **kwargs)


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_call_option(name, option, column):
    check_cell(PIPELINES[name][0](), name, column, _option_caller(name, option))


@pytest.mark.parametrize("column", COLUMNS)
def test_sd35_skip_layer_guidance(column):
    """SD3.5's skip-layer guidance: a second transformer call per step, run stock; a reuse rule inside the
    transformer (with a step cache) leaves it alone too."""
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    check_cell(sd35_pipeline(), "sd35", column, caller("sd35", **slg))


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_enable_disable_enable(name, column):
    """Enabling again on one pipeline after ``disable_pruning`` installs the same hooks afresh and gives the first
    run's output; nothing of the first enabling is left in the hook registries."""
    call = caller(name)
    pipe = PIPELINES[name][0]()
    stock = call(pipe)
    runs = []
    for _ in range(2):
        policy, reuse = parts(column)
        enable_pruning(pipe, policy, reuse=reuse)
        hooks = installed_hooks(pipe)
        runs.append((call(pipe), pruning_macs(pipe), hooks))
        disable_pruning(pipe)
        assert installed_hooks(pipe) == [] and np.array_equal(call(pipe)[0], stock[0])
    (first, macs, hooks), (again, macs_again, hooks_again) = runs
    assert hooks and hooks == hooks_again and macs == macs_again
    assert np.array_equal(first[0], again[0])
