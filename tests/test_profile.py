"""Profiling: adapters, capture hooks, statistics and the trace, on tiny pipelines of all seven families.

References are independent of ditlens: numpy formulas and scikit-image over the raw tensors
captured in the same run, pipelines run without hooks, and the tiny models' hand-derived sizes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import FAMILIES, build_tiny, build_tiny_pipeline, pipeline_call_kwargs

from ditlens.analyzer import ProfileConfig, RawRequest, default_registry, profile
from ditlens.analyzer.profiler import select_stat_keys
from ditlens.errors import DitlensError, UnknownModelError
from ditlens.traces.format import all_stat_keys

STEPS = 3
PROMPTS = {"dit": ["3", "7"]}


def prompts_for(family: str) -> list[str]:
    # Same words, other order: equal text lengths, so raw text tokens are never cut (Latte and
    # Mochi drop padding, and the raw token axis is fixed by the first prompt).
    return PROMPTS.get(family, ["a red cat", "a cat red"])


def run_config(family: str, guidance: float = 3.0, **overrides) -> ProfileConfig:
    """A ProfileConfig that reproduces tiny_models.pipeline_call_kwargs through ditlens's own call path."""
    kwargs = pipeline_call_kwargs(family, "x", STEPS, guidance, 0)
    for key in ("num_inference_steps", "generator", "prompt", "class_labels", "guidance_scale"):
        kwargs.pop(key, None)
    extra = {"guidance_scale": kwargs.pop("guidance_scale", None)} if family == "flux" else {}
    if family == "flux":
        from tiny_models import FLUX_DISTILLED_GUIDANCE

        extra = {"guidance_scale": FLUX_DISTILLED_GUIDANCE}
    config = ProfileConfig(steps=STEPS, guidance=None if family == "flux" else guidance,
                           call_kwargs={**kwargs, **extra}, **overrides)
    return config


@pytest.fixture(scope="module")
def pipelines():
    cache = {}

    def get(family):
        if family not in cache:
            pipe = build_tiny_pipeline(family)
            pipe.set_progress_bar_config(disable=True)
            cache[family] = pipe
        return cache[family]

    return get


# --------------------------------------------------------------------------------------------
# numpy references (DESIGN §4), written directly from the formulas
# --------------------------------------------------------------------------------------------

def np_l1(x, y):
    return np.abs(x - y).mean()


def np_rel_l1(x, y):
    return np.abs(x - y).mean() / np.abs(y).mean()


def np_cosine(x, y):
    return (x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y))


def np_ssim(x, y, grid):
    from skimage.metrics import structural_similarity

    f, h, w = grid
    r = y.max() - y.min()
    side = min(h, w)
    s = min(11, side if side % 2 else side - 1)
    x = x.reshape(f, h, w, -1)
    y = y.reshape(f, h, w, -1)
    vals = [structural_similarity(x[i, :, :, c], y[i, :, :, c], gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=r, win_size=s)
            for i in range(f) for c in range(x.shape[-1])]
    return float(np.mean(vals))


NP_METRICS = {"l1": np_l1, "rel_l1": np_rel_l1, "cosine": np_cosine}


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_equal_numpy_formulas_on_raw_tensors(family, pipelines, tmp_path):
    out = tmp_path / "t.h5"
    config = run_config(family, raw=RawRequest(), stat_keys=all_stat_keys())
    profile(pipelines(family), prompts_for(family), out, config, progress=False, log=lambda s: None)
    assert_stats_match_raw(out)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_statistics_kernel_path_equals_numpy_under_the_triton_interpreter():
    """The device path of the statistics (one Triton launch over every pair, addressed by offsets)
    checked on the CPU: the formula test above, rerun with TRITON_INTERPRET=1 so that the kernel
    path is the one taken (pixart: self and cross attention; sd3: joint, image and text groups)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "test_statistics_equal_numpy_formulas_on_raw_tensors and (pixart or sd3)"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", ["pixart", "sd3", "flux", "cogvideox"])
def test_gpu_statistics_and_bit_identical_output(family, tmp_path):
    """On CUDA: hooks keep the output bit-identical and device statistics equal numpy on raw tensors."""
    pipe = build_tiny_pipeline(family).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def images():
        kwargs = pipeline_call_kwargs(family, prompts_for(family)[0], STEPS, 3.0, 0)
        kwargs["generator"] = torch.Generator("cuda").manual_seed(0)
        with torch.inference_mode():
            return torch.as_tensor(np.asarray(pipe(**kwargs)[0]))

    from ditlens.analyzer.capture import apply_capture
    from ditlens.analyzer.stats import PromptStatistics
    from ditlens.traces.format import all_stat_keys

    reference = images()
    adapter = default_registry().find(pipe.transformer)
    layers = adapter.attention_layers(pipe.transformer)
    stats = PromptStatistics(all_stat_keys(), STEPS, len(layers), adapter.heads(pipe.transformer)[0])
    with apply_capture(pipe.transformer, adapter, stats, cfg_layout=adapter.pipeline_cfg_layout(pipe),
                       max_steps=STEPS, layers=layers):
        assert torch.equal(images(), reference)
    out = tmp_path / "t.h5"
    config = run_config(family, raw=RawRequest(), stat_keys=all_stat_keys())
    profile(pipe, prompts_for(family), out, config, progress=False, log=lambda s: None)
    assert_stats_match_raw(out)


def assert_stats_match_raw(out: Path) -> None:
    from ditlens.traces.reader import Trace

    with Trace.open(out) as trace:
        tokens = trace.tokens
        n_img = tokens.n_image
        raw = {t: trace.raw(t).data.astype(np.float64) for t in "qkvo"}  # prompt,branch,step,layer,head,token,ch
        assert trace.n_done == 2
        branches = list(trace.branches)
        assert branches == ["cond", "uncond"]
        checked = 0
        for key in trace.stat_keys():
            group, tensor, comparison, metric = key
            stat = trace.stat(*key).data
            r = raw[tensor]
            sl = slice(0, n_img) if group == "image" else slice(n_img, None)
            for p in range(2):
                for s in range(STEPS):
                    for l in range(len(trace.layers)):
                        for h in range(trace.header.n_heads):
                            if comparison == "step":
                                pairs = [(b, r[p, b, s, l, h, sl], r[p, b, s - 1, l, h, sl] if s else None, stat[p, b, s, l, h])
                                         for b in range(len(branches))]
                            else:
                                pairs = [(None, r[p, 0, s, l, h, sl], r[p, 1, s, l, h, sl], stat[p, s, l, h])]
                            for _, x, y, value in pairs:
                                # Tokens a sample lacks (Mochi drops text padding per sample) are NaN in raw.
                                if y is not None:
                                    x = x[np.isfinite(x).all(axis=-1)]
                                    y = y[np.isfinite(y).all(axis=-1)]
                                if y is None or x.shape != y.shape or not x.size:
                                    assert np.isnan(value), (key, p, s, l, h)
                                    continue
                                if metric == "ssim":
                                    ref = np_ssim(x, y, tokens.grid)
                                    tol = 2e-2
                                else:
                                    ref = NP_METRICS[metric](x, y)
                                    tol = 1e-2
                                # raw tensors are float16: compare at float16 precision
                                assert value == pytest.approx(ref, rel=tol, abs=tol * 0.1 + 2e-3), (key, p, s, l, h)
                                checked += 1
        assert checked > 100
        assert {k[3] for k in trace.stat_keys()} == {"l1", "rel_l1", "cosine", "ssim"}
        # a model without text tokens (DiT) stores no text group: it would hold only NaN
        assert {k[0] for k in trace.stat_keys()} == ({"image", "text"} if tokens.n_text else {"image"})


@pytest.mark.parametrize("family", FAMILIES)
def test_cond_branch_matches_cfg_free_run(family, pipelines, tmp_path):
    """The rows labelled cond under CFG hold what a run without CFG computes at step 0 (same seed)."""
    from ditlens.traces.reader import Trace

    pipe = pipelines(family)
    prompt = prompts_for(family)[:1]
    with_cfg, without = tmp_path / "cfg.h5", tmp_path / "nocfg.h5"
    raw = RawRequest(tensors=("q", "o"), steps=[0])
    profile(pipe, prompt, with_cfg, run_config(family, 3.0, raw=raw), progress=False, log=lambda s: None)
    profile(pipe, prompt, without, run_config(family, 1.0, raw=raw), progress=False, log=lambda s: None)
    with Trace.open(with_cfg) as a, Trace.open(without) as b:
        assert list(a.branches) == ["cond", "uncond"]
        assert list(b.branches) == ["cond"]
        assert a.header.cfg_layout != "none" and b.header.cfg_layout == "none"
        qa, qb = a.raw("q").data, b.raw("q").data
        # Layer 0 sees the same latents and the cond conditioning in both runs.
        np.testing.assert_allclose(qa[0, 0, 0, 0], qb[0, 0, 0, 0], rtol=2e-3, atol=2e-3)
        assert not np.allclose(qa[0, 1, 0, -1], qb[0, 0, 0, -1], rtol=1e-3, atol=1e-3) or family == "dit"


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_trace_records_the_size_the_pipeline_generates(family, pipelines, tmp_path):
    """Height and width not given: the trace records the image size from the token grid and the
    pipeline's VAE (DiTPipeline has no vae_scale_factor: its VAE's depth gives it)."""
    from ditlens.traces.reader import Trace

    pipe = pipelines(family)
    out = tmp_path / "t.h5"
    profile(pipe, prompts_for(family)[:1], out, run_config(family), progress=False, log=lambda s: None)
    image = np.asarray(pipe(**pipeline_call_kwargs(family, prompts_for(family)[0], 2, 3.0, 0))[0])
    with Trace.open(out) as trace:
        assert (trace.header.height, trace.header.width) == image.shape[1:3]


@pytest.mark.parametrize("family", ["dit", "sd3", "flux"])
def test_identical_cond_and_uncond_give_cfg_cosine_one(family, tmp_path):
    """Transformer-level: a batch of two identical samples has cfg cosine 1 and l1 0; different ones not."""
    from ditlens.analyzer.capture import apply_capture
    from ditlens.analyzer.stats import PromptStatistics
    from ditlens.traces.format import all_stat_keys

    tiny = build_tiny(family)
    adapter = default_registry().find(tiny.transformer)
    layers = adapter.attention_layers(tiny.transformer)
    heads, _ = adapter.heads(tiny.transformer)
    keys = [k for k in all_stat_keys() if k[2] == "cfg" and k[3] in ("l1", "cosine") and k[0] == "image"]
    for identical in (True, False):
        gen = torch.Generator().manual_seed(0)
        inputs = tiny.make_inputs(2, gen)
        if identical:
            inputs = {k: (torch.cat([v[:1], v[:1]]) if torch.is_tensor(v) and v.ndim and v.shape[0] == 2 else v)
                      for k, v in inputs.items()}
        stats = PromptStatistics(keys, 1, len(layers), heads)
        layout = "batched_uncond_first" if family != "flux" else "batched_cond_first"
        with apply_capture(tiny.transformer, adapter, stats, cfg_layout=layout, max_steps=1, layers=layers):
            with torch.no_grad():
                tiny.transformer(**inputs)
        out = stats.finish(["cond", "uncond"])
        l1, cos = out[("image", "o", "cfg", "l1")], out[("image", "o", "cfg", "cosine")]
        if identical:
            assert np.all(l1 == 0) and np.allclose(cos, 1, atol=1e-6)
        else:
            assert np.all(l1 > 0) and np.all(cos < 1 - 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_leave_output_bit_identical_and_nothing_behind(family, pipelines, tmp_path):
    from ditlens.analyzer.capture import CAPTURE_HOOK, TRACKER_HOOK

    pipe = pipelines(family)

    def images():
        kwargs = pipeline_call_kwargs(family, prompts_for(family)[0], STEPS, 3.0, 0)
        with torch.inference_mode():
            return torch.as_tensor(np.asarray(pipe(**kwargs)[0]))

    reference = images()
    # Snapshot after a plain call: pipelines may add diffusers' own state on first use (FLUX's cache_context).
    modules_before = {name: (set(m.__dict__), dict(m._forward_hooks), dict(m._forward_pre_hooks))
                      for name, m in pipe.transformer.named_modules()}
    had_registry = {name for name, m in pipe.transformer.named_modules() if hasattr(m, "_diffusers_hook")}
    from ditlens.analyzer.capture import apply_capture
    from ditlens.analyzer.stats import PromptStatistics
    from ditlens.traces.format import all_stat_keys

    adapter = default_registry().find(pipe.transformer)
    layers = adapter.attention_layers(pipe.transformer)
    heads, _ = adapter.heads(pipe.transformer)
    stats = PromptStatistics(all_stat_keys(), STEPS, len(layers), heads)
    with apply_capture(pipe.transformer, adapter, stats, cfg_layout=adapter.pipeline_cfg_layout(pipe),
                       max_steps=STEPS, layers=layers):
        hooked = images()
    assert torch.equal(reference, hooked), "hooks changed the model output"
    assert np.isfinite(stats.finish(["cond", "uncond"])[("image", "o", "step", "l1")][:, 1:]).all()
    after = {name: (set(m.__dict__), dict(m._forward_hooks), dict(m._forward_pre_hooks))
             for name, m in pipe.transformer.named_modules()}
    assert after == modules_before
    for name, module in pipe.transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert (registry is None) == (name not in had_registry)
        assert registry is None or not any(n.startswith("ditlens") for n in registry.hooks)
    assert torch.equal(images(), reference)
    assert TRACKER_HOOK and CAPTURE_HOOK


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_layout_matches_hand_derived_sizes(family):
    tiny = build_tiny(family)
    adapter = default_registry().find(tiny.transformer)
    assert adapter.family == family
    heads, head_dim = adapter.heads(tiny.transformer)
    assert (heads, head_dim) == (tiny.expected["n_heads"], tiny.expected["head_dim"])
    assert len(adapter.attention_layers(tiny.transformer)) == tiny.expected["n_attention_modules"]
    inputs = tiny.make_inputs(1, torch.Generator().manual_seed(0))
    info = adapter.forward_info(tiny.transformer, (), inputs)
    assert tuple(info.grid) == tuple(tiny.expected["grid"])
    assert adapter.cfg_layout == tiny.expected["cfg_layout"] or family == "flux"
    joint = [layer for layer in adapter.attention_layers(tiny.transformer) if layer.kind == "joint"]
    if tiny.expected["text_position"] in ("first", "last"):
        assert joint and all(layer.text_position == tiny.expected["text_position"] for layer in joint)


def test_unknown_model_names_families_and_register_api():
    class Pipe:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(UnknownModelError) as err:
        profile(Pipe(), ["x"], "never.h5", progress=False)
    message = str(err.value)
    assert "\n" not in message and "Linear" in message
    for family in FAMILIES:
        assert family in message
    assert "register" in message


def test_register_adapter_claims_a_new_class(tmp_path):
    """A user adapter makes an unknown class profilable (here: a renamed DiT)."""
    from diffusers import DiTTransformer2DModel

    from ditlens.analyzer import ModelAdapter
    from ditlens.analyzer.adapters import DiTAdapter

    class MyDiT(DiTTransformer2DModel):
        pass

    class MyAdapter(DiTAdapter):
        family = "mydit"
        transformer_classes = ("MyDiT",)

    pipe = build_tiny_pipeline("dit")
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    mine = MyDiT.from_config(config)
    mine.load_state_dict(pipe.transformer.state_dict())
    pipe.transformer = mine
    registry = default_registry()
    with pytest.raises(UnknownModelError):
        registry.find(torch.nn.Linear(1, 1))
    registry.register(MyAdapter())
    assert isinstance(registry.find(mine), ModelAdapter) and registry.find(mine).family == "mydit"
    profile(pipe, ["3"], tmp_path / "m.h5", run_config("dit"), registry=registry, progress=False, log=lambda s: None)


def test_memory_does_not_grow_with_steps(pipelines):
    """History is one step per (layer, branch) whatever the number of steps."""
    from ditlens.analyzer.profiler import Profiler

    pipe = pipelines("dit")
    sizes = []
    for steps in (2, 6):
        config = run_config("dit")
        config.steps = steps
        profiler = Profiler(pipe, config)
        import ditlens.analyzer.stats as stats_module

        seen = []
        original = stats_module.PromptStatistics.finish

        def spy(self, branches, _orig=original):
            seen.append(len(self._previous))
            return _orig(self, branches)

        stats_module.PromptStatistics.finish = spy
        try:
            profiler.run_prompt(0, "3")
        finally:
            stats_module.PromptStatistics.finish = original
        sizes.append(seen[0])
    assert sizes[0] == sizes[1] == 2 * 2  # layers x branches


# --------------------------------------------------------------------------------------------
# Crash safety and resume
# --------------------------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import ditlens.traces.writer as writer
    from test_profile import run_config
    from tiny_models import build_tiny_pipeline
    from ditlens.analyzer import profile
    original = writer.TraceWriter.write_prompt
    def write_then_die(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 0:
            os._exit(17)   # killed: no cleanup, no close
    writer.TraceWriter.write_prompt = write_then_die
    pipe = build_tiny_pipeline("dit")
    profile(pipe, ["1", "2", "3"], {out!r}, run_config("dit"), progress=False, log=lambda s: None)
""")


def test_killed_profile_keeps_finished_prompts_and_resume_completes_it(pipelines, tmp_path):
    from ditlens.traces.reader import Trace

    out = tmp_path / "killed.h5"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    with Trace.open(out) as trace:
        assert trace.n_done == 1
        assert trace.stat("image", "o", "step", "l1").data.shape[0] == 1

    pipe = pipelines("dit")
    config = run_config("dit")
    config.resume = True
    result = profile(pipe, ["1", "2", "3"], out, config, progress=False, log=lambda s: None)
    assert result.n_new == 2
    full = tmp_path / "full.h5"
    profile(pipe, ["1", "2", "3"], full, run_config("dit"), progress=False, log=lambda s: None)
    with Trace.open(out) as resumed, Trace.open(full) as reference:
        assert resumed.n_done == reference.n_done == 3
        for key in reference.stat_keys():
            np.testing.assert_array_equal(resumed.stat(*key).data, reference.stat(*key).data)


# --------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing recorded lost
# --------------------------------------------------------------------------------------------

def test_existing_trace_is_not_overwritten(pipelines, tmp_path):
    out = tmp_path / "t.h5"
    profile(pipelines("dit"), ["1"], out, run_config("dit"), progress=False, log=lambda s: None)
    before = out.read_bytes()
    with pytest.raises(DitlensError, match="--resume"):
        profile(pipelines("dit"), ["1"], out, run_config("dit"), progress=False, log=lambda s: None)
    assert out.read_bytes() == before


def test_resume_with_other_steps_names_the_field(pipelines, tmp_path):
    out = tmp_path / "t.h5"
    profile(pipelines("dit"), ["1", "2"], out, run_config("dit"), progress=False, log=lambda s: None)
    config = run_config("dit")
    config.steps, config.resume = 4, True
    with pytest.raises(DitlensError, match="steps"):
        profile(pipelines("dit"), ["1", "2", "3"], out, config, progress=False, log=lambda s: None)


@pytest.mark.parametrize("family", ["latte", "mochi"])
def test_resume_and_merge_across_prompts_of_other_text_lengths(family, pipelines, tmp_path):
    """Latte and Mochi keep each prompt's own text tokens: a trace of a short prompt resumes with a
    longer one, and shards made on each merge, both equal to one run of the two prompts (resume and
    merge refused the other text length as another run). Shards out of prompt order are refused."""
    from ditlens.traces.merge import merge_traces
    from ditlens.traces.reader import Trace

    pipe, quiet = pipelines(family), dict(progress=False, log=lambda s: None)
    short, longer = "a cat", "a dog on a red sofa in a sunny living room"
    single, resumed, a, b = (tmp_path / f"{n}.h5" for n in ("single", "resumed", "a", "b"))
    profile(pipe, [short, longer], single, run_config(family), **quiet)
    profile(pipe, [short], resumed, run_config(family), **quiet)
    profile(pipe, [short, longer], resumed, run_config(family, resume=True), **quiet)
    profile(pipe, [short], a, run_config(family), **quiet)
    profile(pipe, [longer], b, run_config(family, prompt_offset=1), **quiet)
    with Trace.open(a) as ta, Trace.open(b) as tb:
        assert ta.tokens.n_text < tb.tokens.n_text  # the premise: the two prompts differ in text length
    merged = merge_traces([a, b], tmp_path / "merged.h5")
    with Trace.open(single) as one:
        for other in (resumed, merged):
            with Trace.open(other) as trace:
                assert list(trace.prompts) == [short, longer]
                for key in one.stat_keys():
                    np.testing.assert_array_equal(trace.stat(*key).data, one.stat(*key).data, err_msg=str(key))
    import shutil

    again = shutil.copy(b, tmp_path / "b2.h5")  # the second shard given twice: prompt 1 again, not 2
    with pytest.raises(DitlensError, match=r"b2\.h5 starts at prompt 1 .* end at prompt 2; give the shards in prompt order"):
        merge_traces([a, b, again], tmp_path / "m2.h5")


def test_resume_with_other_recording_options_is_refused_before_any_compute(pipelines, tmp_path):
    """Resuming with other statistics, influence, raw selection, pipeline arguments or prompt
    offset is refused naming the option, before a prompt is computed; candidates not named are the
    trace's own."""
    pipe, quiet = pipelines("pixart"), dict(progress=False, log=lambda s: None)
    out = tmp_path / "t.h5"
    first = dict(stat_keys=select_stat_keys("l1,ssim", None), influence=True, influence_candidates="ast,window(3)",
                 raw=RawRequest(tensors=("o",), layers=[1]))
    profile(pipe, ["a cat"], out, run_config("pixart", **first), **quiet)
    before = out.read_bytes()
    calls = []
    counter = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for change, message in [
                (dict(stat_keys=select_stat_keys("l1", None)), "pass the --metrics and --tensors of the first run"),
                (dict(influence=False), "records per-head influence; pass --influence"),
                (dict(influence_candidates="ast,window(2)"), "influence candidates are ast,window\\(3\\)"),
                (dict(raw=None), "records raw tensors; pass --raw o"),
                (dict(raw=RawRequest(tensors=("o",), layers=[0])), "raw selection differs"),
                (dict(prompt_offset=3), "prompt_offset=0 but this run has 3")]:
            config = run_config("pixart", **{**first, **change, "resume": True})
            with pytest.raises(DitlensError, match=message):
                profile(pipe, ["a cat", "a dog"], out, config, **quiet)
        config = run_config("pixart", **first, resume=True)
        config.call_kwargs["max_sequence_length"] = config.call_kwargs["max_sequence_length"] + 1
        with pytest.raises(DitlensError, match="cannot resume: the trace has call.max_sequence_length="):
            profile(pipe, ["a cat", "a dog"], out, config, **quiet)
        assert calls == [] and out.read_bytes() == before
    finally:
        counter.remove()
    result = profile(pipe, ["a cat", "a dog"], out, run_config("pixart", **{**first, "influence_candidates": None},
                                                              resume=True), **quiet)
    assert result.n_new == 1


def test_a_trace_with_the_old_all_nan_text_group_resumes(pipelines, tmp_path, monkeypatch):
    """Traces from before the profiler left out the text group of a model without text tokens
    (DiT) hold it, all NaN: such a trace resumes with the same options, and the new prompts'
    text rows stay NaN while their image rows are written."""
    import h5py

    import ditlens.analyzer.profiler as profiler_module

    pipe, quiet = pipelines("dit"), dict(progress=False, log=lambda s: None)
    out = tmp_path / "old.h5"
    l1 = [k for k in all_stat_keys() if k[3] == "l1"]
    with monkeypatch.context() as patch:
        patch.setattr(profiler_module, "recorded_stat_keys", lambda keys, branches, n_text: list(keys))  # the old writer
        profile(pipe, ["1"], out, run_config("dit", stat_keys=l1), **quiet)
    assert profile(pipe, ["1", "2"], out, run_config("dit", stat_keys=l1, resume=True), **quiet).n_new == 1
    with h5py.File(out, "r") as f:
        assert np.isnan(f["stats/text/q/cfg/l1"][...]).all()
        assert np.isfinite(f["stats/image/q/cfg/l1"][1]).all()  # the resumed prompt


def test_a_trace_with_the_old_all_nan_text_group_merges_with_a_new_one(pipelines, tmp_path, monkeypatch):
    """An old DiT shard (all-NaN text group) and a new one (no text group) merge into what one run of
    both prompts writes: the same statistics, equal values, no text group."""
    import ditlens.analyzer.profiler as profiler_module
    from ditlens.traces.merge import merge_traces
    from ditlens.traces.reader import Trace

    pipe, quiet = pipelines("dit"), dict(progress=False, log=lambda s: None)
    l1 = [k for k in all_stat_keys() if k[3] == "l1"]
    old, new, single = (tmp_path / f"{n}.h5" for n in ("old", "new", "single"))
    with monkeypatch.context() as patch:
        patch.setattr(profiler_module, "recorded_stat_keys", lambda keys, branches, n_text: list(keys))  # the old writer
        profile(pipe, ["1"], old, run_config("dit", stat_keys=l1), **quiet)
    profile(pipe, ["2"], new, run_config("dit", stat_keys=l1, prompt_offset=1), **quiet)
    profile(pipe, ["1", "2"], single, run_config("dit", stat_keys=l1), **quiet)
    with Trace.open(old) as t_old, Trace.open(new) as t_new:
        assert any(k[0] == "text" for k in t_old.stat_keys()) and not any(k[0] == "text" for k in t_new.stat_keys())
    merged = merge_traces([old, new], tmp_path / "merged.h5")
    with Trace.open(single) as one, Trace.open(merged) as trace:
        assert trace.stat_keys() == one.stat_keys()
        for key in one.stat_keys():
            np.testing.assert_array_equal(trace.stat(*key).data, one.stat(*key).data, err_msg=str(key))


def test_info_analyze_and_compare_leave_out_the_all_nan_text_group_of_an_old_trace(pipelines, tmp_path,
                                                                                   monkeypatch, capsys):
    """`ditlens info` of an old DiT trace counts the statistics a run fills (what a new trace of
    the run holds) and names the all-NaN rest; `ditlens analyze` stores maps of those only, and
    `ditlens compare` with a new trace compares those."""
    import h5py

    import ditlens.analyzer.profiler as profiler_module
    from ditlens.analyzer.maps import analyze, compare
    from ditlens.cli import main

    pipe, quiet = pipelines("dit"), dict(progress=False, log=lambda s: None)
    l1 = [k for k in all_stat_keys() if k[3] == "l1"]
    old, new = tmp_path / "old.h5", tmp_path / "new.h5"
    with monkeypatch.context() as patch:
        patch.setattr(profiler_module, "recorded_stat_keys", lambda keys, branches, n_text: list(keys))  # the old writer
        profile(pipe, ["1", "2"], old, run_config("dit", stat_keys=l1), **quiet)
    profile(pipe, ["1", "2"], new, run_config("dit", stat_keys=l1), **quiet)
    with h5py.File(new, "r") as f:
        filled = [f"image/{t}/{c}/l1" for t in f["stats/image"] for c in f["stats/image"][t]]
        assert "text" not in f["stats"]
    assert main(["info", str(old)]) == 0
    assert f"stats      {len(filled)} maps (and {len(l1) - len(filled)} all-NaN ones" in capsys.readouterr().out
    report = analyze(old)
    assert sorted(report.stored) == sorted(f"/maps/{kind}/{key}" for kind in ("mean", "cv") for key in filled)
    with h5py.File(old, "r") as f:
        assert "text" in f["stats"]
        for name in report.stored:
            assert np.isfinite(f[name][...]).any(), name
    rows = compare(old, new).rows
    assert rows and {name for name, _, _ in rows} <= set(filled)


def test_bad_output_paths_and_selections_are_refused_before_any_compute(pipelines, tmp_path):
    from ditlens.cli import _int_list

    pipe, quiet = pipelines("dit"), dict(progress=False, log=lambda s: None)
    (tmp_path / "file.h5").write_bytes(b"")
    with pytest.raises(DitlensError, match="cannot make the folder of"):
        profile(pipe, ["1"], tmp_path / "file.h5" / "t.h5", run_config("dit"), **quiet)
    with pytest.raises(DitlensError, match="is a directory"):
        profile(pipe, ["1"], tmp_path, run_config("dit"), **quiet)
    with pytest.raises(DitlensError, match="runs backwards: write it as 0-1"):
        _int_list("1-0")
    with pytest.raises(DitlensError, match="--raw-layers selects nothing"):
        profile(pipe, ["1"], tmp_path / "t.h5", run_config("dit", raw=RawRequest(layers=[])), **quiet)
    with pytest.raises(DitlensError, match="--token-stride must be >= 1"):
        profile(pipe, ["1"], tmp_path / "t.h5", run_config("dit", raw=RawRequest(token_stride=0)), **quiet)
    assert not (tmp_path / "t.h5").exists()


def test_raw_byte_cap_refuses_before_writing(pipelines, tmp_path):
    out = tmp_path / "t.h5"
    config = run_config("dit", raw=RawRequest(max_bytes=1000))
    with pytest.raises(DitlensError, match="max-raw-bytes"):
        profile(pipelines("dit"), ["1", "2"], out, config, progress=False, log=lambda s: None)
    assert not out.exists()


def test_raw_selection_out_of_range(pipelines, tmp_path):
    config = run_config("dit", raw=RawRequest(layers=[0, 99]))
    with pytest.raises(DitlensError, match="out of range"):
        profile(pipelines("dit"), ["1"], tmp_path / "t.h5", config, progress=False, log=lambda s: None)


def test_raw_selection_stride_and_subset(pipelines, tmp_path):
    from ditlens.traces.reader import Trace

    out = tmp_path / "t.h5"
    config = run_config("sd3", raw=RawRequest(tensors=("k",), layers=[1], steps=[0, 2], heads=[2], token_stride=3))
    profile(pipelines("sd3"), ["a cat"], out, config, progress=False, log=lambda s: None)
    with Trace.open(out) as trace:
        raw = trace.raw("k")
        n_tokens = trace.tokens.n_image + trace.tokens.n_text
        assert raw.data.shape == (1, 2, 2, 1, 1, len(range(0, n_tokens, 3)), trace.header.head_dim)
        assert list(raw.coords["token"]) == list(range(0, n_tokens, 3))
        assert list(trace.array("/raw/index/step").data) == [0, 2]
        assert list(trace.array("/raw/index/layer").data) == [1]
        assert list(raw.coords["step"]) == list(trace.timesteps[[0, 2]])
        assert not trace.has("/raw/q")
        # Layer 1 is SD3.5's image-only attention: image tokens stored, text tokens absent (NaN).
        n_img = len(range(0, trace.tokens.n_image, 3))
        assert np.isfinite(raw.data[..., :n_img, :]).all() and np.isnan(raw.data[..., n_img:, :]).all()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from ditlens.cli import main

    bad = tmp_path / "not_a_trace.h5"
    bad.write_bytes(b"hello")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert main(["profile", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o.h5"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    # an error of the pipeline itself (here an argument it does not take) is one line too, with its type
    assert main(["profile", "--model", "tiny-dit", "--out", str(tmp_path / "p.h5"), "--prompt", "1", "--steps", "1",
                 "--call-arg", "bogus=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: TypeError:") and "bogus" in err and "DITLENS_TRACEBACK=1" in err


def test_analyze_and_compare(pipelines, tmp_path):
    from ditlens.analyzer import analyze, compare
    from ditlens.traces.reader import Trace

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    profile(pipelines("pixart"), ["a cat", "a dog", "a red box"], a, run_config("pixart"), progress=False,
            log=lambda s: None)
    config = run_config("pixart")
    config.steps = 5
    profile(pipelines("pixart"), ["a cat", "a dog"], b, config, progress=False, log=lambda s: None)
    report = analyze(a)
    text = report.render()
    assert "most redundant" in text and "coefficient of variation" in text
    for top in (0, -2):
        with pytest.raises(DitlensError, match="--top must be at least 1"):
            analyze(a, top=top)
    with Trace.open(a) as trace:
        stat = trace.stat("image", "k", "step", "l1").data
        mean = trace.array("/maps/mean/image/k/step/l1").data
        cv = trace.array("/maps/cv/image/k/step/l1").data
        with np.errstate(all="ignore"):
            np.testing.assert_allclose(mean, np.nanmean(stat, axis=0), rtol=1e-6, equal_nan=True)
            np.testing.assert_allclose(cv, np.nanstd(stat, axis=0) / np.nanmean(stat, axis=0), rtol=1e-5,
                                       equal_nan=True)
        expected_cv = float(np.nanmean(cv))
    assert report.cv_table["step/l1"]["k"] == pytest.approx(expected_cv, rel=1e-6)
    comparison = compare(a, b)
    assert comparison.steps == (3, 5)
    assert comparison.rows and all(-1 <= rho <= 1 for _, rho, _ in comparison.rows)
    same = compare(a, a)
    assert all(rho == pytest.approx(1.0) for _, rho, _ in same.rows)


# --------------------------------------------------------------------------------------------
# Influence of compression candidates (offline search input)
# --------------------------------------------------------------------------------------------

def _dense_band_attention(q, k, v, n_img, w, text_first_seq: bool):
    """float64 reference on canonical tokens (image then text): image-image pairs |i-j| <= w,
    every pair with a text query or key kept (arrow; with no text tokens it is the window)."""
    n = q.shape[1]
    i = np.arange(n)
    img = i < n_img
    band = (np.abs(i[:, None] - i[None, :]) <= w) & img[:, None] & img[None, :]
    keep = band | ~img[:, None] | ~img[None, :]
    scores = np.einsum("hqd,hkd->hqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(keep[None], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,hkd->hqd", p, v)


def _attended_sequences(kind: str, grid: tuple[int, int, int], n_tokens: int) -> list[np.ndarray]:
    """Canonical token indices (frame-major image tokens, then text) of each sequence a layer attends
    over: one per frame (self), one per grid position across frames (temporal), one in all (joint)."""
    frames, hw = grid[0], grid[1] * grid[2]
    if kind == "self":
        return [np.arange(f * hw, (f + 1) * hw) for f in range(frames)]
    if kind == "temporal":
        return [np.arange(frames) * hw + p for p in range(hw)]
    return [np.arange(n_tokens)]


@pytest.mark.parametrize("family", ["dit", "sd3", "flux", "latte", "mochi"])
def test_influence_equals_rse_share_from_raw_tensors(family, pipelines, tmp_path):
    from ditlens.traces.reader import Trace

    out = tmp_path / "i.h5"
    config = run_config(family, raw=RawRequest(), influence=True)
    profile(pipelines(family), prompts_for(family)[:1], out, config, progress=False, log=lambda s: None)
    with Trace.open(out) as trace:
        labels = trace.attrs["influence_candidates"].split(",")
        influence = trace.array("/influence/rse")
        assert influence.axes == ("prompt", "branch", "step", "layer", "head", "candidate")
        data = influence.data[0]
        raw = {t: trace.raw(t).data[0].astype(np.float64) for t in "qkvo"}  # branch,step,layer,head,token,ch
        n_img = trace.tokens.n_image
        kinds = trace.attrs["layer_kinds"].split(",")
        checked = ragged = 0
        windowed_kinds: set[str] = set()
        for b, branch in enumerate(trace.branches):
            for s in range(STEPS):
                for l in range(len(trace.layers)):
                    rows = np.isfinite(raw["o"][b, s, l]).all(axis=(0, 2))  # tokens this layer has
                    counts = {int(np.isfinite(raw["o"][x, s, l]).all(axis=(0, 2)).sum()) for x in range(len(trace.branches))}
                    compared = rows.copy()
                    if len(counts) > 1:  # text lengths differ per sample (Mochi): image tokens are compared
                        compared[n_img:] = False
                        ragged += 1
                    o = raw["o"][b, s, l][:, compared]
                    denominator = ((o - o.mean()) ** 2).sum()
                    for c, label in enumerate(labels):
                        value = data[b, s, l, :, c]
                        if label == "ast":
                            if s == 0:
                                assert np.isnan(value).all()
                                continue
                            other = raw["o"][b, s - 1, l][:, compared]
                        elif label == "asc":
                            if branch == "cond":
                                assert np.isnan(value).all()
                                continue
                            other = raw["o"][trace.branches.index("cond"), s, l][:, compared]
                        else:
                            w = int(label[label.index("(") + 1:-1])
                            sequences = _attended_sequences(kinds[l], trace.tokens.grid, int(rows.sum()))
                            seq_img = n_img if kinds[l] == "joint" else len(sequences[0])
                            if kinds[l] not in ("self", "temporal", "joint") or w >= seq_img - 1:
                                assert np.isnan(value).all()  # cross attention, or a window keeping every pair
                                continue
                            q, k, v = (raw[t][b, s, l][:, rows] for t in "qkv")
                            other = np.empty_like(q)
                            for idx in sequences:
                                other[:, idx] = _dense_band_attention(q[:, idx], k[:, idx], v[:, idx], seq_img, w, False)
                            other = other[:, :o.shape[1]]  # canonical order: image tokens first
                            windowed_kinds.add(kinds[l])
                        expected = ((other - o) ** 2).sum(axis=(1, 2)) / denominator
                        np.testing.assert_allclose(value, expected, rtol=3e-2, atol=2e-4)
                        checked += 1
        assert checked >= 3 * len(labels)
        assert any(l.startswith(("window", "arrow")) for l in labels) and "ast" in labels
        assert ("asc" in labels) == (family != "mochi")  # Mochi attends per sample: CFG share cannot run there
        assert windowed_kinds and (family != "latte" or {"self", "temporal"} <= windowed_kinds)
        assert (ragged > 0) == (family == "mochi")


def test_attention_modules_taken_out_return_their_recorded_outputs_and_come_back(pipelines):
    """The module-scope share times the forward with every attention module returning what it
    returned before, uncomputed: the transformer's output is bit-identical, no processor runs
    inside, and the modules are their own again afterwards (joint attention returns a tuple)."""
    from ditlens.analyzer.amdahl import (_Switch, capture_forward_inputs, measure_attention_share,
                                         modules_replaced_by_outputs)

    pipe = pipelines("sd3")
    config = run_config("sd3")
    adapter = default_registry().find(pipe.transformer)
    modules = [pipe.transformer.get_submodule(site.name) for site in adapter.attention_layers(pipe.transformer)]
    kwargs = adapter.call_kwargs(pipe, "a cat", STEPS, 3.0, None, None, torch.Generator().manual_seed(0))
    kwargs.update(config.call_kwargs)
    args, forward_kwargs = capture_forward_inputs(pipe, kwargs)
    with torch.inference_mode():
        reference = pipe.transformer(*args, **forward_kwargs)[0]
    calls = []
    processors = [m.processor for m in modules]
    for m, proc in zip(modules, processors):
        m.processor = lambda *a, _p=proc, **k: calls.append(1) or _p(*a, **k)
    try:
        with modules_replaced_by_outputs(pipe.transformer, args, forward_kwargs, modules):
            recorded = len(calls)
            with torch.inference_mode():
                skipped = pipe.transformer(*args, **forward_kwargs)[0]
            assert len(calls) == recorded == len(modules)  # one real forward records; the timed one computes none
        torch.testing.assert_close(skipped, reference, rtol=0, atol=0)
        assert all("forward" not in m.__dict__ for m in modules)
        with torch.inference_mode():
            pipe.transformer(*args, **forward_kwargs)
        assert len(calls) == 2 * len(modules)
        switch = _Switch(drop=False)  # the share's timing: hooks on, taking the work out only while set
        with modules_replaced_by_outputs(pipe.transformer, args, forward_kwargs, modules, switch):
            with torch.inference_mode():
                computed = pipe.transformer(*args, **forward_kwargs)[0]
                switch.drop = True
                skipped = pipe.transformer(*args, **forward_kwargs)[0]
            assert len(calls) == 4 * len(modules)  # recorded once, computed once with the switch off
    finally:
        for m, proc in zip(modules, processors):
            m.processor = proc
    torch.testing.assert_close(computed, reference, rtol=0, atol=0)
    torch.testing.assert_close(skipped, reference, rtol=0, atol=0)
    share = measure_attention_share(pipe, kwargs, repeats=2, modules=modules)
    assert share.scope == "modules" and 0.0 <= share.share < 1.0 and "attention modules" in share.describe()
    assert len(share.round_shares) == 2
    with pytest.raises(DitlensError, match="did not run"):
        with modules_replaced_by_outputs(pipe.transformer, args, forward_kwargs, [torch.nn.Linear(2, 2)]):
            pass


def test_attention_share_and_amdahl_bound(pipelines, tmp_path):
    """The share is measured on the model (dropping attention makes the forward faster, not
    free) and the bound follows 1 / (1 - a s); profile stores both in the trace."""
    from ditlens.analyzer.amdahl import AttentionShare, capture_forward_inputs, measure_attention_share
    from ditlens.traces.reader import Trace

    share = AttentionShare(step_seconds=2.0, without_attention_seconds=1.5)
    assert share.share == pytest.approx(0.25)
    assert share.bound(0.76) == pytest.approx(1 / (1 - 0.25 * 0.76))
    assert share.bound(0.0) == 1.0
    with pytest.raises(DitlensError):
        share.bound(1.5)

    pipe = pipelines("sd3")
    config = run_config("sd3")
    from ditlens.analyzer.profiler import Profiler

    profiler = Profiler(pipe, config)
    kwargs = profiler.adapter.call_kwargs(pipe, "a cat", STEPS, 3.0, None, None, torch.Generator().manual_seed(0))
    kwargs.update(config.call_kwargs)
    args, forward_kwargs = capture_forward_inputs(pipe, kwargs)
    assert forward_kwargs["hidden_states"].shape[0] == 2  # CFG batch of the first step
    measured = measure_attention_share(pipe, kwargs, repeats=3)
    assert measured.step_seconds > 0 and 0.0 <= measured.share < 1.0 and len(measured.round_shares) == 3
    out = tmp_path / "t.h5"
    profile(pipe, ["a cat"], out, config, progress=False, log=lambda s: None)
    with Trace.open(out) as trace:
        assert 0.0 <= float(trace.attrs["attention_share"]) < 1.0
        assert float(trace.attrs["forward_seconds"]) > 0


def test_share_timings_alternate_and_say_when_the_share_is_within_noise():
    """Forwards with and without attention alternate round by round (a drifting host slows both
    alike), each untimed switch before its own call, after one untimed warm-up round; a share
    smaller than half its rounds' spread says it is below the host's timing noise."""
    from ditlens.analyzer.amdahl import AttentionShare, _round_robin_seconds

    events: list[str] = []
    calls = [(lambda: events.append("set with"), lambda: events.append("with")),
             (lambda: events.append("set without"), lambda: events.append("without"))]
    with_times, without_times = _round_robin_seconds(calls, 3, torch.device("cpu"), contextlib.nullcontext)
    assert events == ["set with", "with", "set without", "without"] * 4
    assert len(with_times) == len(without_times) == 3 and min(with_times + without_times) >= 0

    noisy = AttentionShare(1.0, 0.99, round_shares=(-0.02, 0.01, 0.04))
    assert noisy.below_noise and "timing noise (rounds -2.0% to +4.0%)" in noisy.describe()
    clear = AttentionShare(1.0, 0.7, round_shares=(0.28, 0.3, 0.31))
    assert not clear.below_noise and "noise" not in clear.describe()
    busy = AttentionShare(1.0, 0.5, round_shares=(-0.17, 0.5, 0.6))  # one slow round, a share well above it
    assert not busy.below_noise
    assert not AttentionShare(1.0, 1.0).below_noise  # graph replays keep no rounds


def test_steps_told_apart_when_bf16_timesteps_collide(tmp_path):
    """FLUX passes timesteps in the latents' dtype: in bfloat16 neighbouring steps near t=1 round to
    one value. Profile, plan runtime and search must still count one step per scheduler step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ditlens.compress import Plan, apply_plan

    steps = 16
    pipe = build_tiny_pipeline("flux").to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                 shift=30.0)
    seen: list[float] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(k["timestep"].flatten()[0])), with_kwargs=True)
    pipe(**pipeline_call_kwargs("flux", "x", steps, 1.0, 0))
    hook.remove()
    assert len(set(seen)) < len(seen) == steps  # the premise: two steps share a timestep
    config = run_config("flux", guidance=1.0)
    config = ProfileConfig(**{**config.__dict__, "steps": steps})
    profile(pipe, ["x"], tmp_path / "t.h5", config, progress=False, log=lambda s: None)
    from ditlens.traces import Trace

    with Trace.open(tmp_path / "t.h5") as trace:
        assert len(trace.timesteps) == steps and trace.prompts == ["x"] and trace.complete
    plan = Plan.uniform(pipe, steps, "ast", at_steps=range(1, steps, 2), cfg_layout="none",
                        n_text=pipeline_call_kwargs("flux", "x", 1, 1.0, 0)["max_sequence_length"])
    with apply_plan(pipe, plan) as handle:
        pipe(**pipeline_call_kwargs("flux", "x", steps, 1.0, 0))
        assert handle.flops.core_fraction < 0.6


def test_interception_swaps_sdpa_and_falls_back_for_private_references():
    """Calls through torch.nn.functional are caught by the swap; a module holding its own
    reference to SDPA is caught by the TorchFunctionMode fallback; torch's function is restored
    afterwards, also after an exception."""
    import torch.nn.functional as F

    from ditlens.analyzer.capture import AttentionInterceptor, InterceptRoute, run_intercepted

    torch_sdpa = F.scaled_dot_product_attention
    private = F.scaled_dot_product_attention  # e.g. `from torch.nn.functional import scaled_dot_product_attention`
    q = torch.randn(1, 2, 5, 4)
    seen: list[str] = []

    def handler(func, q_, k_, v_, args, kwargs):
        seen.append("call")
        assert func is torch_sdpa
        return func(*args, **kwargs) * 0 + 7.0

    public_route, private_route = InterceptRoute(), InterceptRoute()
    out = run_intercepted(lambda: F.scaled_dot_product_attention(q, q, q), handler, public_route)
    assert torch.all(out == 7.0) and seen == ["call"] and not public_route.use_mode
    out = run_intercepted(lambda: private(q, q, q), handler, private_route)
    assert torch.all(out == 7.0) and seen == ["call", "call"] and private_route.use_mode
    assert F.scaled_dot_product_attention is torch_sdpa
    with pytest.raises(RuntimeError):
        with AttentionInterceptor(handler):
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is torch_sdpa
