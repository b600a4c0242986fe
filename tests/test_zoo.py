"""The embedded models: loading from package data, pipeline contracts, quality of seeded samples.

References are independent of the code under test: numpy painting for scene composition,
closed forms / eigen-decompositions for the Fréchet distance, the real Fashion-MNIST labels
for the classifier, forward hooks for the CFG batch order.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlens.errors import DitlensError
from ditlens.zoo import MODELS, load_classifier, load_pipeline, model_dir
from ditlens.zoo.classifier import frechet_distance, to_classifier_input
from ditlens.zoo.data import (
    COLOUR_NAMES,
    COLOURS,
    FASHION_CLASSES,
    REGION_NAMES,
    SceneItem,
    _read_idx,
    caption_for,
    class_index,
    compose_scenes,
    fashion_mnist_dir,
    load_fashion_mnist,
    nearest_colour,
    region_crops,
)
from ditlens.zoo.evaluate import judge_scenes
from ditlens.zoo.text import WordTokenizer, default_vocabulary

HAVE_FASHION_MNIST = (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def dit_pipe():
    pipe = load_pipeline("tiny-dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def mmdit_pipe():
    pipe = load_pipeline("tiny-mmdit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- registry and package data


def test_models_listed_and_unknown_name_is_one_line_error() -> None:
    assert set(MODELS) == {"tiny-dit", "tiny-mmdit"}
    with pytest.raises(DitlensError) as info:
        load_pipeline("tiny-unet")
    message = str(info.value)
    assert "\n" not in message and "tiny-dit" in message and "tiny-mmdit" in message


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-mmdit", "classifier"])
def test_shipped_weights_are_fp16_and_small(name: str) -> None:
    from safetensors import safe_open

    files = sorted(model_dir(name).rglob("*.safetensors"))
    assert files, f"no weights shipped for {name}"
    assert sum(f.stat().st_size for f in files) <= 15 * 1024 * 1024
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
        assert dtypes <= {"F16", "I64"}, (path, dtypes)  # I64: BatchNorm's batch counter


def test_loaded_transformers_are_the_diffusers_classes(dit_pipe, mmdit_pipe) -> None:
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel

    assert isinstance(dit_pipe.transformer, DiTTransformer2DModel)
    assert isinstance(mmdit_pipe.transformer, SD3Transformer2DModel)
    assert dit_pipe.transformer.dtype == torch.float32
    index = json.loads((model_dir("tiny-mmdit") / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]


# ---------------------------------------------------------------- data


def test_idx_reader_round_trip_and_truncation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())
    np.testing.assert_array_equal(_read_idx(path), array)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes()[:-7])
    with pytest.raises(DitlensError, match="truncated"):
        _read_idx(path)


def test_class_names_and_aliases() -> None:
    assert [class_index(name) for name in FASHION_CLASSES] == list(range(10))
    assert class_index("Sneaker") == 7 and class_index("ankle  boot") == 9 and class_index("boot") == 9
    assert class_index(3) == 3
    with pytest.raises(DitlensError, match="sneaker"):
        class_index("sock")
    with pytest.raises(DitlensError):
        class_index(10)


def test_compose_scenes_matches_numpy_painting() -> None:
    rng = np.random.default_rng(1)
    batch, slots = 5, 3
    items = rng.random((batch, slots, 28, 28)).astype(np.float32)
    regions = np.stack([rng.permutation(4)[:slots] for _ in range(batch)])
    colours = rng.random((batch, slots, 3)).astype(np.float32)
    present = rng.random((batch, slots)) < 0.7
    expected = np.zeros((batch, 64, 64, 3), np.float64)
    for b in range(batch):
        for s in range(slots):
            if present[b, s]:
                row, col = [(0, 0), (0, 1), (1, 0), (1, 1)][regions[b, s]]  # tl, tr, bl, br
                top, left = 32 * row + 2, 32 * col + 2
                expected[b, top : top + 28, left : left + 28] += items[b, s][..., None] * colours[b, s]
    canvas = compose_scenes(torch.from_numpy(items), torch.from_numpy(regions), torch.from_numpy(colours),
                            torch.from_numpy(present))
    got = canvas.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    crops = region_crops(got)
    for b in range(batch):
        for s in range(slots):
            want = items[b, s][..., None] * colours[b, s] if present[b, s] else 0.0
            np.testing.assert_allclose(crops[b, regions[b, s]], np.broadcast_to(want, (28, 28, 3)), atol=1e-6)


def test_nearest_colour_names_tinted_items() -> None:
    rng = np.random.default_rng(2)
    grey = rng.random((28, 28)) * 0.8 + 0.2
    crops = np.stack([grey[..., None] * np.asarray(rgb) for rgb in COLOURS.values()] + [np.zeros((28, 28, 3))])
    index, lit = nearest_colour(crops)
    assert index.tolist() == list(range(len(COLOURS))) + [-1]
    assert lit[-1] == 0


def test_caption_grammar_and_tokenizer() -> None:
    items = [SceneItem(7, "red", "top left"), SceneItem(9, "blue", "bottom right"), SceneItem(0, "white", "top right")]
    caption = caption_for(items)
    assert caption == "a red sneaker top left, a blue ankle boot bottom right and a white t-shirt top right"
    tokenizer = WordTokenizer(default_vocabulary(), max_length=32)
    out = tokenizer([caption, "", "a purple sneaker"])
    vocab = tokenizer.vocabulary
    words = caption.replace(",", " ,").split()
    n = len(words) + 1
    assert [vocab[i] for i in out.input_ids[0, :n].tolist()] == ["<bos>"] + words
    assert out.attention_mask[0].sum() == n and out.input_ids[0, n:].eq(0).all()
    assert out.input_ids[1, 0] == tokenizer.bos_token_id and out.attention_mask[1].sum() == 1
    assert vocab[int(out.input_ids[2, 2])] == "<unk>"  # "purple" is not a scene colour
    for word in [*COLOUR_NAMES, *" ".join(FASHION_CLASSES).split(), *" ".join(REGION_NAMES).split()]:
        assert word in tokenizer.token_to_id


# ---------------------------------------------------------------- classifier and FID


def _reference_frechet(mean_a, cov_a, mean_b, cov_b) -> float:
    """tr(sqrt(A B)) as the sum of square roots of the eigenvalues of sqrt(A) B sqrt(A)."""
    values, vectors = np.linalg.eigh(cov_a)
    root_a = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def test_frechet_distance_against_references() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random(6) + 0.1, rng.random(6) + 0.1
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    closed_form = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(closed_form, rel=1e-9)
    x, y = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    cov_a, cov_b = x @ x.T + 0.1 * np.eye(8), y @ y.T + 0.1 * np.eye(8)
    assert frechet_distance(mu_a[:1].repeat(8), cov_a, mu_b[:1].repeat(8), cov_b) == pytest.approx(
        _reference_frechet(mu_a[:1].repeat(8), cov_a, mu_b[:1].repeat(8), cov_b), rel=1e-7)
    assert frechet_distance(mu_a, np.diag(a), mu_a, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


@needs_data
def test_classifier_accuracy_and_input_layouts(classifier) -> None:
    test = load_fashion_mnist("test")
    images, labels = test.images[:2000], test.labels[:2000]
    predicted = classifier.predict(images)
    assert (predicted == labels).mean() >= 0.90
    # The same items as the pipelines hand them over must give the same answers.
    floats = images.astype(np.float32) / 255.0
    padded = np.pad(floats, ((0, 0), (2, 2), (2, 2)))[..., None]  # tiny-dit: [N, 32, 32, 1]
    np.testing.assert_array_equal(classifier.predict(padded[:300]), predicted[:300])
    red = floats[:300, :, :, None] * np.array([1.0, 0.0, 0.0], np.float32)  # a red scene crop [N, 28, 28, 3]
    np.testing.assert_array_equal(classifier.predict(red), predicted[:300])
    upscaled = np.repeat(np.repeat(floats[:300], 2, axis=1), 2, axis=2)[..., None]  # 56x56 -> resized
    assert (classifier.predict(upscaled) == predicted[:300]).mean() >= 0.95
    features = classifier.features(images[:10])
    assert features.shape == (10, classifier.config.feature_dim)
    with pytest.raises(DitlensError):
        to_classifier_input(np.zeros((2, 28, 30, 1), np.float32))


@needs_data
def test_classifier_fid_is_small_for_real_and_large_for_noise(classifier) -> None:
    train = load_fashion_mnist("train")
    real = classifier.fid(classifier.features(train.images[:2000]))
    noise = classifier.fid(classifier.features(np.random.default_rng(4).integers(0, 256, (500, 28, 28), dtype=np.uint8)))
    assert real < 0.1 * noise


@needs_data
def test_scene_judge_on_real_scenes(classifier) -> None:
    test = load_fashion_mnist("test")
    rng = np.random.default_rng(5)
    scenes, picks = [], []
    for _ in range(40):
        regions = rng.permutation(4)[:2]
        chosen = rng.integers(0, 2000, 2)
        scenes.append([SceneItem(int(test.labels[i]), COLOUR_NAMES[int(rng.integers(7))], REGION_NAMES[r])
                       for i, r in zip(chosen, regions)])
        picks.append((chosen, regions))
    items = np.stack([test.images[c] for c, _ in picks]).astype(np.float32) / 255.0
    regions = np.stack([r for _, r in picks])
    colours = np.array([[COLOURS[item.colour] for item in scene] for scene in scenes], np.float32)
    canvas = compose_scenes(torch.from_numpy(items), torch.from_numpy(regions), torch.from_numpy(colours),
                            torch.ones(40, 2, dtype=torch.bool)).permute(0, 2, 3, 1).numpy()
    verdict = judge_scenes(canvas, scenes, classifier)
    assert verdict.colour_correct.all() and verdict.empty_correct.all()
    assert verdict.class_correct.mean() >= 0.85
    # A wrong caption must be caught: shift every class by one.
    wrong = [[SceneItem((it.class_id + 1) % 10, it.colour, it.region) for it in scene] for scene in scenes]
    assert judge_scenes(canvas, wrong, classifier).class_correct.mean() <= 0.2


# ---------------------------------------------------------------- tiny-dit


def test_tiny_dit_cfg_layout_is_cond_first(dit_pipe) -> None:
    assert dit_pipe._ditlens_cfg_layout == "batched_cond_first"
    seen: list[torch.Tensor] = []
    hook = dit_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True)
    try:
        dit_pipe(class_labels=[3, "bag"], num_inference_steps=2, guidance_scale=4.0, output_type="np")
        dit_pipe(class_labels=[3], num_inference_steps=2, guidance_scale=1.0, output_type="np")
    finally:
        hook.remove()
    assert seen[0].tolist() == [3, 8, 10, 10]  # cond first, then the null class
    assert seen[-1].tolist() == [3]  # no unconditional branch at guidance 1


def test_tiny_dit_accepts_names_like_ints(dit_pipe) -> None:
    by_name = dit_pipe(class_labels=["trouser", "ankle boot"], num_inference_steps=3,
                       generator=torch.Generator().manual_seed(0), output_type="np").images
    by_index = dit_pipe(class_labels=[1, 9], num_inference_steps=3,
                        generator=torch.Generator().manual_seed(0), output_type="np").images
    assert by_name.shape == (2, 32, 32, 1) and by_name.dtype == np.float32
    assert 0.0 <= by_name.min() and by_name.max() <= 1.0
    np.testing.assert_array_equal(by_name, by_index)
    with pytest.raises(DitlensError, match="sneaker"):
        dit_pipe(class_labels=["sock"], num_inference_steps=1)


def test_tiny_dit_seeded_samples_are_classified_as_asked(dit_pipe, classifier) -> None:
    labels = list(range(10))
    images = dit_pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="np").images
    predicted = classifier.predict(images)
    assert (predicted == np.array(labels)).sum() >= 8, predicted.tolist()


# ---------------------------------------------------------------- tiny-mmdit


def test_tiny_mmdit_cfg_layout_and_transformer_call(mmdit_pipe) -> None:
    assert mmdit_pipe._ditlens_cfg_layout == "batched_uncond_first"
    calls: list[dict] = []
    hook = mmdit_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}),
        with_kwargs=True)
    try:
        mmdit_pipe(prompt="a red bag top left and a blue sneaker bottom right", num_inference_steps=1, output_type="np")
    finally:
        hook.remove()
    kwargs = calls[0]
    assert kwargs["hidden_states"].shape == (2, 3, 64, 64)
    empty, _, empty_pooled, _ = mmdit_pipe.encode_prompt("", do_classifier_free_guidance=False)
    torch.testing.assert_close(kwargs["encoder_hidden_states"][:1], empty)  # uncond (empty caption) first
    torch.testing.assert_close(kwargs["pooled_projections"][:1], empty_pooled)
    assert not torch.allclose(kwargs["encoder_hidden_states"][1:], empty)
    tokens = mmdit_pipe.transformer.pos_embed(kwargs["hidden_states"][:1])
    assert tokens.shape[1] >= 1024
    with pytest.raises(DitlensError):
        mmdit_pipe(prompt="a red bag top left", height=65, num_inference_steps=1)


def test_tiny_mmdit_seeded_scenes_put_items_where_the_caption_says(mmdit_pipe, classifier) -> None:
    # Each captioned item in its own quadrant, in its colour, classified as its class; the
    # quadrants the caption leaves out stay dark (docs/zoo_results.md: 95 % / 100 % over 400 scenes).
    scenes = [[SceneItem(1, "red", "top left"), SceneItem(8, "cyan", "bottom right")],
              [SceneItem(7, "yellow", "top right"), SceneItem(3, "green", "bottom left"),
               SceneItem(9, "white", "bottom right")],
              [SceneItem(5, "blue", "bottom left"), SceneItem(0, "magenta", "top right")]]
    images = mmdit_pipe(prompt=[caption_for(s) for s in scenes], generator=torch.Generator().manual_seed(0),
                        output_type="np").images
    assert images.shape == (3, 64, 64, 3) and 0.0 <= images.min() and images.max() <= 1.0
    verdict = judge_scenes(images, scenes, classifier)
    assert verdict.occupied_correct.all() and verdict.empty_correct.all()
    assert verdict.colour_correct.all()
    assert verdict.class_correct.sum() >= 6  # of 7 items


# ---------------------------------------------------------------- training scripts (smoke)


@needs_data
def test_training_scripts_run_and_output_loads(tmp_path: Path) -> None:
    from training import train_tiny_dit, train_tiny_mmdit
    from ditlens.zoo.pipelines import TinyDiTPipeline, TinyMMDiTPipeline

    assert train_tiny_dit.main(["--steps", "1", "--batch-size", "2", "--limit-train", "16", "--device", "cpu",
                                "--out", str(tmp_path / "dit"), "--record", str(tmp_path / "dit.json")]) == 0
    assert train_tiny_mmdit.main(["--steps", "1", "--batch-size", "2", "--device", "cpu",
                                  "--out", str(tmp_path / "mm"), "--record", str(tmp_path / "mm.json")]) == 0
    dit = TinyDiTPipeline.from_pretrained(str(tmp_path / "dit"))
    mm = TinyMMDiTPipeline.from_pretrained(str(tmp_path / "mm"))
    assert dit.transformer.config.num_embeds_ada_norm == 10
    assert mm.tokenizer.vocabulary == default_vocabulary()
    assert json.loads((tmp_path / "dit.json").read_text())["steps"] == 1
