"""The dashboard driven in headless Chromium (Debian's chromium + chromium-driver, through selenium).

Each test serves the app from a thread, clicks through it like a user and reads the figures
back from the page (plotly's ``gd.data``), comparing them with numpy over the HDF5 file. The
browser console must stay free of errors. The same tests save a full-page screenshot of every
view into docs/screenshots/.
"""

from __future__ import annotations

import logging
import shutil
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import pytest

from test_dashboard_support import (
    PROMPTS,
    STEPS,
    build_dashboard_data,
    nan_equal,
    quiet_nanmean,
    ref_cv,
    ref_head_step,
    ref_layer_step,
)

pytest.importorskip("dash")
pytest.importorskip("selenium", reason="selenium is not installed (pip install 'ditlens[test]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")

# The screenshots in docs/ are refreshed on request (DITLENS_SCREENSHOTS=1); other runs, CI
# included, write them to a temporary folder so a test run leaves the checkout clean.
SHOTS = (Path(__file__).resolve().parents[1] / "docs" / "screenshots" if os.environ.get("DITLENS_SCREENSHOTS") == "1"
         else Path(tempfile.gettempdir()) / "ditlens-screenshots")
WIDTH = 1400
TIMEOUT = 30.0
LAYERS = 3


# ---------------------------------------------------------------------------------------------
# Harness


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_dashboard_data(tmp_path_factory.getbasetemp())


@contextmanager
def serve(app) -> Iterator[str]:
    """The app's Flask server on a free local port, in a thread."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def driver():
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)  # no access log lines in the test output
    profile_dir = tempfile.mkdtemp(prefix="ditlens-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                 f"--user-data-dir={profile_dir}", f"--window-size={WIDTH},1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile_dir, ignore_errors=True)
        werkzeug_log.setLevel(level)


@pytest.fixture(autouse=True)
def no_console_errors(driver):
    """Every test ends with an empty list of browser console errors."""
    driver.get_log("browser")  # drop what an earlier test left
    yield
    errors = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
    assert errors == [], f"browser console errors: {errors}"


def poll(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Wait until ``condition()`` returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as err:  # the element may be re-rendering
            last = err
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


FIGURE_JS = """
const root = document.getElementById(arguments[0]);
if (!root) return null;
const gd = root.classList.contains('js-plotly-plot') ? root : root.querySelector('.js-plotly-plot');
if (!gd || !gd.data) return null;
return JSON.parse(JSON.stringify({
  data: gd.data.map(t => ({type: t.type, z: t.z, x: t.x, y: t.y, meta: t.meta, name: t.name, text: t.text})),
  title: (gd.layout.title || {}).text || ''}));
"""


def figure(driver, graph_id: str) -> dict | None:
    return driver.execute_script(FIGURE_JS, graph_id)


def wait_figure(driver, graph_id: str, check: Callable[[dict], bool], what: str) -> dict:
    def ready():
        fig = figure(driver, graph_id)
        return fig if fig and fig["data"] and check(fig) else None

    return poll(ready, f"{graph_id}: {what}")


def z_equals(expected: np.ndarray) -> Callable[[dict], bool]:
    return lambda fig: nan_equal(fig["data"][0]["z"], expected)


def open_page(driver, url: str) -> None:
    driver.set_window_size(WIDTH, 1000)
    driver.get(url)
    poll(lambda: driver.find_elements(By.CSS_SELECTOR, ".tab"), "the tabs")


def open_tab(driver, label: str) -> None:
    tab = poll(lambda: [t for t in driver.find_elements(By.CSS_SELECTOR, ".tab") if t.text == label], f"tab {label}")
    tab[0].click()
    poll(lambda: driver.find_element(By.CSS_SELECTOR, ".tab--selected").text == label, f"tab {label} selected")


def click_radio(driver, radio_id: str, value: str) -> None:
    def visible_label():
        label = driver.find_element(By.CSS_SELECTOR, f'#{radio_id} label:has(input[value="{value}"])')
        return label if label.is_displayed() else None

    label = poll(visible_label, f"{radio_id}={value} shown")
    label.click()
    poll(lambda: driver.find_element(By.CSS_SELECTOR, f'#{radio_id} input[value="{value}"]').is_selected(),
         f"{radio_id}={value} selected")


def choose(driver, dropdown_id: str, option_text: str) -> None:
    """Open a dropdown and click the option with exactly this text."""
    poll(lambda: driver.find_element(By.ID, dropdown_id).is_displayed(), f"dropdown {dropdown_id}")
    driver.find_element(By.ID, dropdown_id).click()
    option = poll(lambda: [o for o in driver.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option")
                           if o.is_displayed() and o.text == option_text], f"option {option_text!r} of {dropdown_id}")
    option[0].click()
    poll(lambda: dropdown_value(driver, dropdown_id) == option_text, f"{dropdown_id} shows {option_text!r}")


def dropdown_value(driver, dropdown_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{dropdown_id} .dash-dropdown-value").text


def screenshot(driver, name: str) -> Path:
    """A full-page PNG of the current view in docs/screenshots/."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # the window holds the browser's own bars: grow it until the page fits
        content, inner, outer = driver.execute_script(
            "return [document.body.scrollHeight, window.innerHeight, window.outerHeight];")
        if inner >= content + 10:
            break
        driver.set_window_size(WIDTH, min(4000, content + 20 + (outer - inner)))
        time.sleep(0.7)  # plotly relayouts to the new size
    path = SHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    driver.set_window_size(WIDTH, 1000)
    assert path.stat().st_size > 10_000
    return path


@pytest.fixture(scope="module")
def full_app(files):
    from ditlens.dashboards import create_app

    app = create_app(files.full, plan=[files.plan_ast, files.plan_heads], report=files.report)
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def plain_app(files):
    from ditlens.dashboards import create_app

    with serve(create_app(files.plain)) as url:
        yield url


# ---------------------------------------------------------------------------------------------
# Tests


def test_page_loads_and_overview_describes_the_run(driver, full_app, files):
    open_page(driver, full_app)
    facts = poll(lambda: driver.find_element(By.ID, "overview-facts").text, "the run facts")
    with h5py.File(files.full, "r") as f:
        assert f"{f.attrs['model_id']} [{f.attrs['family']}]" in facts
        assert str(f.attrs["pipeline_class"]) in facts
    assert f"{STEPS} steps" in facts and f"{len(PROMPTS)} of {len(PROMPTS)} finished" in facts
    contents = driver.find_element(By.ID, "overview-contents").text
    for group in ("/influence", "/locality", "/maps", "/meta", "/stats"):
        assert group in contents
    for prompt in PROMPTS:
        assert prompt in driver.find_element(By.CSS_SELECTOR, "#view").text
    assert not driver.find_element(By.ID, "stat-controls").is_displayed()  # no statistic controls here
    screenshot(driver, "overview")


def test_maps_follow_metric_branch_prompt_head_and_layer(driver, full_app, files):
    open_page(driver, full_app)
    open_tab(driver, "Redundancy maps")
    path = files.full
    key = ("image", "o", "step", "l1")
    wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(path, key, 0, None, None)), "o/step/l1, cond, mean")
    lines = figure(driver, "maps-lines")
    assert len(lines["data"]) == LAYERS
    for i, trace in enumerate(lines["data"]):
        assert nan_equal(trace["y"], ref_layer_step(path, key, 0, None, None)[i])

    click_radio(driver, "ctl-metric", "cosine")
    key = ("image", "o", "step", "cosine")
    fig = wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(path, key, 0, None, None)), "cosine")
    assert "cosine similarity" in fig["title"]

    click_radio(driver, "ctl-branch", "uncond")
    wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(path, key, 1, None, None)), "uncond branch")

    choose(driver, "ctl-prompt", f"1: {PROMPTS[1]}")
    wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(path, key, 1, 1, None)), "prompt 1")
    choose(driver, "ctl-head", "head 2")
    fig = wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(path, key, 1, 1, 2)), "head 2")
    assert "head 2" in fig["title"]

    layers = figure(driver, "maps-heatmap")["data"][0]["y"]
    choose(driver, "ctl-layer", f"1: {layers[1]}")
    fig = wait_figure(driver, "maps-heads", z_equals(ref_head_step(path, key, 1, 1, 1)), "heads of layer 1")
    assert fig["title"].startswith(layers[1])

    click_radio(driver, "ctl-tensor", "k")
    click_radio(driver, "ctl-comparison", "cfg")  # cond vs uncond: no branch to choose
    key = ("image", "k", "cfg", "cosine")
    wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(path, key, None, 1, 2)), "k/cfg/cosine")
    poll(lambda: not driver.find_element(By.ID, "wrap-branch").is_displayed(), "the branch control hidden")

    # clicking a cell of the last layer drills down into that layer's heads
    choose(driver, "ctl-prompt", f"mean of {len(PROMPTS)} prompts")
    choose(driver, "ctl-head", "mean over heads")
    wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(path, key, None, None, None)), "prompt and head mean")
    plot = driver.find_element(By.CSS_SELECTOR, "#maps-heatmap .nsewdrag")
    box = plot.rect
    ActionChains(driver).move_to_element_with_offset(plot, int(box["width"] / 4), int(box["height"] / 3)).click().perform()
    poll(lambda: dropdown_value(driver, "ctl-layer") == f"2: {layers[2]}", "the clicked layer selected")
    wait_figure(driver, "maps-heads", z_equals(ref_head_step(path, key, None, None, 2)), "heads of the clicked layer")

    choose(driver, "ctl-layer", f"0: {layers[0]}")
    click_radio(driver, "ctl-tensor", "o")
    click_radio(driver, "ctl-comparison", "step")
    click_radio(driver, "ctl-branch", "cond")
    click_radio(driver, "ctl-metric", "l1")
    wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(path, ("image", "o", "step", "l1"), 0, None, None)),
                "back to the first view")
    screenshot(driver, "redundancy_maps")


def test_text_group_offers_only_its_metrics(driver, full_app, files):
    open_page(driver, full_app)
    open_tab(driver, "Redundancy maps")
    click_radio(driver, "ctl-metric", "ssim")
    click_radio(driver, "ctl-group", "text")  # SSIM needs the image grid: the metric falls back to one that exists
    key = ("text", "o", "step", "l1")
    wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(files.full, key, 0, None, None)), "text o step l1")
    values = [i.get_attribute("value") for i in driver.find_elements(By.CSS_SELECTOR, "#ctl-metric input")]
    assert values == ["l1", "rel_l1", "cosine"]


def test_prompt_variability_shows_cv_maps_and_table(driver, full_app, files):
    open_page(driver, full_app)
    open_tab(driver, "Prompt variability")
    key = ("image", "o", "step", "l1")
    wait_figure(driver, "vari-cv", z_equals(ref_cv(files.full, key, 0)), "CV map")
    assert not driver.find_element(By.ID, "wrap-prompt").is_displayed()
    rows = poll(lambda: driver.find_elements(By.CSS_SELECTOR, "#vari-cv-table tr"), "the CV table")
    header = [c.text for c in rows[0].find_elements(By.TAG_NAME, "th")]
    assert header == ["image map", "Q", "K", "V", "O"]
    table = {r.find_elements(By.TAG_NAME, "td")[0].text: [c.text for c in r.find_elements(By.TAG_NAME, "td")[1:]]
             for r in rows[1:]}
    with h5py.File(files.full, "r") as f:
        v = np.asarray(f["/stats/image/v/cfg/rel_l1"][:], dtype=np.float64)
    with np.errstate(all="ignore"):
        cv = v.std(axis=0) / v.mean(axis=0)
    assert table["cfg/rel_l1"][2] == f"{np.mean(cv[np.isfinite(cv)]):.3f}"
    curves = wait_figure(driver, "vari-curves", lambda f: len(f["data"]) == len(PROMPTS) + 1, "prompt curves")
    with h5py.File(files.full, "r") as f:
        v = np.asarray(f["/stats/image/o/step/l1"][:, 0, :, 0, :], dtype=np.float64)  # cond, layer 0
    for p in range(len(PROMPTS)):
        assert nan_equal(curves["data"][p]["y"], quiet_nanmean(v[p], axis=1))
    click_radio(driver, "ctl-branch", "uncond")
    wait_figure(driver, "vari-cv", z_equals(ref_cv(files.full, key, 1)), "CV map of uncond")
    click_radio(driver, "ctl-branch", "cond")
    wait_figure(driver, "vari-cv", z_equals(ref_cv(files.full, key, 0)), "CV map of cond")
    screenshot(driver, "prompt_variability")


def test_influence_maps_render_and_follow_pickers(driver, full_app, files):
    open_page(driver, full_app)
    open_tab(driver, "Influence")
    with h5py.File(files.full, "r") as f:
        rse = np.asarray(f["/influence/rse"][:], dtype=np.float64)  # prompt,branch,step,layer,head,candidate
    mean_ph = quiet_nanmean(rse, axis=(0, 4))  # branch, step, layer, candidate
    fig = wait_figure(driver, "influence-graph", z_equals(mean_ph[0, :, :, 0].T), "cond, candidate 0")
    assert fig["data"][0]["x"] == [str(s) for s in range(STEPS)]
    candidate_box = driver.find_element(By.ID, "influence-wrap-pick-candidate")
    candidate_box.find_element(By.CSS_SELECTOR, ".dash-dropdown").click()
    labels = poll(lambda: [o.text for o in driver.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option")
                           if o.is_displayed()], "candidate options")
    target = labels[-1]  # the last candidate
    [o for o in driver.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option") if o.text == target][0].click()
    last = rse.shape[-1] - 1
    wait_figure(driver, "influence-graph", z_equals(mean_ph[0, :, :, last].T), "last candidate")
    choose(driver, "influence-y", "head")  # head x step: the layer becomes a picker
    layer_picker = poll(lambda: driver.find_element(By.ID, "influence-wrap-pick-layer"), "a layer picker")
    assert layer_picker.is_displayed()
    # layer defaults to its first entry, candidate to its first again (the pickers are rebuilt)
    expected = quiet_nanmean(rse, axis=0)[0, :, 0, :, 0].T  # head x step of layer 0, candidate 0, cond
    wait_figure(driver, "influence-graph", z_equals(expected), "head x step of layer 0")
    screenshot(driver, "influence")


def test_locality_maps_render(driver, full_app, files):
    open_page(driver, full_app)
    open_tab(driver, "Locality")
    with h5py.File(files.full, "r") as f:
        mass = np.asarray(f["/locality/mass"][:], dtype=np.float64)  # prompt,step,layer,head,band
    wait_figure(driver, "locality-graph", z_equals(mass.mean(axis=(0, 3))[:, :, 0].T), "band 0")
    choose(driver, "locality-x", "band")
    wait_figure(driver, "locality-graph", lambda f: f["data"][0]["x"] == ["w<=1", "w<=2", "w<=4", "all"],
                "band labels across")
    choose(driver, "locality-y", "head")
    # step became a picker (first entry), layer a picker (first entry); prompt stays averaged
    wait_figure(driver, "locality-graph", z_equals(mass.mean(axis=0)[0, 0, :, :]), "head x band of step 0 layer 0")
    screenshot(driver, "locality")
    choose(driver, "locality-y", "(one row)")  # the head becomes a picker too (mean by default)
    wait_figure(driver, "locality-graph", z_equals(mass.mean(axis=(0, 3))[0, 0][None, :]), "one row")


def _decoded(fig: dict) -> list[list[str]]:
    heat = fig["data"][0]
    return [[heat["meta"][int(code)] for code in row] for row in heat["z"]]


def test_plan_view_renders_two_plans_side_by_side(driver, full_app, files):
    import json

    open_page(driver, full_app)
    open_tab(driver, "Plans")
    ast = json.loads(files.plan_ast.read_text())["methods"]  # [step][layer]
    heads = json.loads(files.plan_heads.read_text())["methods"]
    fig = wait_figure(driver, "plan-a-methods", lambda f: f["data"][0]["type"] == "heatmap", "left plan map")
    assert _decoded(fig) == [[ast[s][i] for s in range(STEPS)] for i in range(LAYERS)]
    assert {d["name"] for d in fig["data"][1:]} == {"full", "ast"}  # the legend
    fig = wait_figure(driver, "plan-b-methods", lambda f: f["data"][0]["type"] == "heatmap", "right plan map")
    assert _decoded(fig) == [["arrow(2)"] * STEPS] * LAYERS and fig["data"][0]["text"] == [["2/3"] * STEPS] * LAYERS
    compare = driver.find_element(By.ID, "plans-compare").text
    assert compare == f"{STEPS * LAYERS} of {STEPS * LAYERS} (step, layer) entries differ"
    flops = wait_figure(driver, "plan-flops", lambda f: len(f["data"]) == 2, "FLOPs per step")
    assert flops["data"][0]["y"] == [1.0, 0.0, 1.0, 0.0]  # AST steps skip the attention module
    assert "0.500" in driver.find_element(By.ID, "plan-a-summary").text
    choose(driver, "plan-layer", "2: " + json.loads(files.plan_heads.read_text())["model"]["layers"][2]["name"])
    fig = wait_figure(driver, "plan-b-heads",
                      lambda f: _decoded(f) == [[heads[s][2][h] for s in range(STEPS)] for h in range(3)],
                      "per-head methods of layer 2")
    assert [row[0] for row in _decoded(fig)] == ["arrow(2)", "full", "arrow(2)"]
    screenshot(driver, "plans")
    choose(driver, "plan-b", "(none)")
    poll(lambda: driver.find_element(By.ID, "plan-col-b").text == "", "the right column empty")
    wait_figure(driver, "plan-flops", lambda f: len(f["data"]) == 1, "one plan's FLOPs")


def test_validation_view_shows_metrics_and_image_grid(driver, full_app, files):
    import json

    open_page(driver, full_app)
    open_tab(driver, "Validation")
    raw = json.loads((files.report / "validate.json").read_text())
    metrics = poll(lambda: driver.find_element(By.ID, "report-metrics").text, "the metrics table")
    assert f"PSNR (dB, mean) {np.mean(raw['psnr']):.2f}" in metrics
    assert f"SSIM (mean) {np.mean(raw['ssim']):.4f}" in metrics
    prompts = driver.find_element(By.ID, "report-prompts").text
    for prompt, value in zip(raw["prompts"], raw["psnr"]):
        assert f"{prompt} {value:.2f}" in prompts
    size = poll(lambda: driver.execute_script(
        "const i = document.getElementById('report-grid'); return i && i.complete && i.naturalWidth ? "
        "[i.naturalWidth, i.naturalHeight] : null;"), "the image grid loaded")
    from PIL import Image

    with Image.open(files.report / "grid.png") as image:
        assert list(size) == list(image.size)
    screenshot(driver, "validation")


def test_trace_without_influence_shows_the_message(driver, plain_app, files):
    open_page(driver, plain_app)
    open_tab(driver, "Influence")
    message = poll(lambda: driver.find_element(By.ID, "influence-msg").text, "the influence message")
    assert message == "this trace has no influence maps: profile with --influence"
    assert driver.find_elements(By.ID, "influence-graph") == []
    screenshot(driver, "influence_missing")
    open_tab(driver, "Plans")
    assert "no plan given" in poll(lambda: driver.find_element(By.ID, "plans-msg").text, "the plans message")
    open_tab(driver, "Validation")
    assert "no validation report given" in poll(lambda: driver.find_element(By.ID, "validation-msg").text,
                                                "the validation message")
    open_tab(driver, "Redundancy maps")  # no /maps here: the prompt mean is computed from /stats
    key = ("image", "o", "step", "l1")
    wait_figure(driver, "maps-heatmap", z_equals(ref_layer_step(files.plain, key, 0, None, None)), "computed mean")
    note = driver.find_element(By.ID, "maps-note").text
    assert "/stats/image/o/step/l1, mean of 2 prompts" in note
