"""The interactive convolution page (`cnnlab viz conv --html`): its numbers against PyTorch, and the page itself
driven in a real headless Chromium through Selenium (Debian's chromium and chromium-driver)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnlab.cli import main
from cnnlab.errors import ConfigError
from cnnlab.viz.conv import color_filters, default_image, integer_scale, load_image, numeric_example, to_levels
from cnnlab.viz.conv_page import PADDINGS, STRIDES, conv_page_data, write_conv_page


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a command writes by default lands here, not in the repository


def cnnlab(capsys, *args) -> tuple[int, str, str]:
    """The command line in this process (torch is imported already): exit code, stdout, stderr."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def scene_tensors(size=7, filters=2):
    """What the page's first example should hold, built here independently of the page's code."""
    x = torch.from_numpy(to_levels(default_image(size))).permute(2, 0, 1).double()
    _, bank = color_filters(filters)
    w = torch.from_numpy(np.stack([f * integer_scale(f) for f in bank])).round().double()
    return x, w, torch.zeros(filters, dtype=torch.float64)


def test_page_data_holds_pythons_outputs_for_every_stride_and_padding():
    data = conv_page_data()
    scene, cs231n = data["examples"]
    x, w, b = scene_tensors()
    assert np.array_equal(scene["x"], x.numpy()) and np.array_equal(scene["weight"], w.numpy())
    assert scene["filters"] == ["vertical edge", "horizontal edge"] and scene["scales"] == [3, 3]
    ex = numeric_example()
    assert np.array_equal(cs231n["x"], ex.x) and cs231n["bias"] == [1, 0]
    assert cs231n["default"] == {"stride": 2, "padding": 1}
    assert np.array_equal(cs231n["results"]["s2p1"]["out"], ex.out)  # the slides' worked example, 3x3x2
    for example in (scene, cs231n):
        xt, wt, bt = (torch.tensor(example[key], dtype=torch.float64) for key in ("x", "weight", "bias"))
        xt = xt[None]
        for s in STRIDES:
            for p in PADDINGS:
                res = example["results"][f"s{s}p{p}"]
                want = F.conv2d(xt, wt, bt, stride=s, padding=p)
                assert np.array_equal(res["out"], want[0].numpy()), (example["key"], s, p)
                if min(want.shape[2:]) < 2:  # smaller than one pooling window
                    assert res["pool"] is None
                    continue
                values, indices = F.max_pool2d(F.relu(want), 2, 2, return_indices=True)
                assert np.array_equal(res["pool"]["values"], values[0].numpy())
                assert np.array_equal(res["pool"]["indices"], indices[0].numpy())
    tiny = conv_page_data(size=4)["examples"][0]["results"]
    assert tiny["s3p0"]["pool"] is None and np.array(tiny["s3p0"]["out"]).shape == (2, 1, 1)  # nothing to pool


def test_page_refuses_sizes_that_hide_numbers_and_bad_filter_counts():
    with pytest.raises(ConfigError, match="image side must be 4..12 pixels; got 16"):
        conv_page_data(size=16)
    with pytest.raises(ConfigError, match="filters must be 1..8"):
        conv_page_data(filters=0)


def test_page_is_self_contained(tmp_path):
    page = write_conv_page(tmp_path / "conv.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert page.count("<img ") == 2 and "data:image/png;base64," in page  # the pictures travel inside the page
    assert "default-src 'none'" in page  # and the page may fetch nothing, even by mistake
    assert "{{" not in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.html"]  # no temp file left


def test_cli_writes_the_page_for_your_image_and_fails_cleanly(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "cat <b>.png")
    code, out, _ = cnnlab(
        capsys, "viz", "conv", "--html", "--image", tmp_path / "cat <b>.png", "--filters", "3", "--size", "6"
    )
    page = (tmp_path / "viz" / "conv.html").read_text()
    assert code == 0 and out.strip() == "viz/conv.html"
    data = json.loads(page.split('<script id="cnnlab-data" type="application/json">')[1].split("</script>")[0])
    mine = data["examples"][0]
    want = to_levels(load_image(tmp_path / "cat <b>.png", 6, gray=False)).transpose(2, 0, 1)
    assert np.array_equal(mine["x"], want) and len(mine["weight"]) == 3
    assert "cat <b>.png" not in page and "cat &lt;b&gt;.png" in page  # a file name is text, never markup

    code, _, err = cnnlab(capsys, "viz", "conv", "--html", "--size", "30", "--out", tmp_path / "new" / "folder")
    assert code == 2 and "image side must be 4..12 pixels; got 30" in err
    assert not (tmp_path / "new").exists()
    code, _, err = cnnlab(capsys, "viz", "conv", "--html", "--filters", "0")
    assert code == 2 and "filters must be 1..8; got 0" in err
    code, _, err = cnnlab(capsys, "viz", "pool", "--html")
    assert code == 2 and "--html is for 'cnnlab viz conv'" in err


# ---------------------------------------------------------------------------------------------- in a browser

BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(
            f"{what} is missing in CI: .ci/run should install Debian's chromium and chromium-driver, and "
            "the test extra selenium"
        )
    pytest.skip(f"{what} is missing on this machine (apt-get install chromium chromium-driver; pip install selenium)")


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        _missing("chromium" if chromium is None else "chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # both paths given: Selenium never looks for (or downloads) a browser
    for flag in BROWSER_FLAGS + [
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2200",
        "--force-device-scale-factor=1",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(element, name: str, tmp_path: Path) -> Path:
    """A screenshot of one part of the page; into $CNNLAB_SCREENSHOTS when set (the pictures in docs/screenshots), as a
    256-colour PNG: the page's flat colours lose nothing and the file is a fraction of the size."""
    folder = Path(os.environ.get("CNNLAB_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    raw = tmp_path / f"raw-{name}"
    element.screenshot(str(raw))
    Image.open(raw).convert("RGB").quantize(256).save(path, optimize=True)
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.shape[1] > 400 and pixels.std() > 10 and (pixels < 128).mean() > 0.01, name  # not blank
    return path


READ_CONV = """
const t = id => document.getElementById(id).textContent, at = document.getElementById('conv-current').dataset;
return {k: +at.k, i: +at.i, j: +at.j, value: t('conv-value'), sum: t('conv-sum'), bias: t('conv-bias'),
        cell: t('o-' + at.k + '-' + at.i + '-' + at.j)};
"""


def test_page_in_a_real_headless_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    page = write_conv_page(tmp_path / "conv.html")
    browser.get(page.resolve().as_uri())
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.TAG_NAME, "html").get_attribute("data-ready"))
    for id_ in ("conv-value", "conv-sum", "conv-size", "pool-value", "pool-size", "o-0-0-0"):
        assert browser.find_element(By.ID, id_).is_displayed(), id_
    text = lambda id_: browser.execute_script(f"return document.getElementById('{id_}').textContent")  # noqa: E731
    data = lambda id_, key: int(browser.find_element(By.ID, id_).get_attribute(f"data-{key}"))  # noqa: E731
    click = lambda id_: browser.find_element(By.ID, id_).click()  # noqa: E731

    def conv_matches(x, w, b, stride, padding):
        """The window's output number and sum of products as shown, against PyTorch; returns (k, i, j)."""
        shown = browser.execute_script(READ_CONV)  # one round trip for everything a reader sees of this step
        k, i, j = shown["k"], shown["i"], shown["j"]
        want = F.conv2d(x[None], w, b, stride=stride, padding=padding)[0]
        products = F.conv2d(x[None], w, None, stride=stride, padding=padding)[0]
        assert int(shown["value"]) == want[k, i, j] and int(shown["sum"]) == products[k, i, j], (shown, k, i, j)
        assert int(shown["bias"]) == b[k]
        assert shown["cell"] == shown["value"]  # the output map fills in with the same number
        return k, i, j

    def size_shown(x, w, stride, padding):
        want = F.conv2d(x[None], w, stride=stride, padding=padding)[0]
        return (data("conv-size", "depth"), data("conv-size", "ho"), data("conv-size", "wo")) == tuple(want.shape)

    x, w, b = scene_tensors()
    assert size_shown(x, w, 1, 1)  # the scene starts at stride 1, padding 1: 7x7x2
    assert conv_matches(x, w, b, 1, 1) == (0, 0, 0)
    for expected in [(0, 0, 1), (0, 0, 2), (0, 0, 3)]:
        click("conv-step")
        assert conv_matches(x, w, b, 1, 1) == expected
    assert text("o-0-0-4") == ""  # not computed yet
    browser.find_element(By.ID, "conv-step").send_keys(Keys.SPACE)  # the buttons work from the keyboard
    browser.find_element(By.ID, "conv-back").send_keys(Keys.ENTER)
    browser.find_element(By.ID, "conv-step").send_keys(Keys.ENTER)
    assert conv_matches(x, w, b, 1, 1) == (0, 0, 4)
    conv_shot = _shot(browser.find_element(By.ID, "conv"), "conv-page.png", tmp_path)

    for stride, padding in [(2, 1), (3, 0), (2, 2)]:  # other choices: new sizes, new numbers, window from the start
        Select(browser.find_element(By.ID, "stride")).select_by_value(str(stride))
        Select(browser.find_element(By.ID, "padding")).select_by_value(str(padding))
        assert size_shown(x, w, stride, padding), (stride, padding)
        assert conv_matches(x, w, b, stride, padding) == (0, 0, 0)
        for _ in range(4):
            click("conv-step")
            conv_matches(x, w, b, stride, padding)
    # the slider jumps to the last window: every output number is then shown, and equals PyTorch's
    browser.execute_script(
        "var r = document.getElementById('conv-position'); r.value = r.max;r.dispatchEvent(new Event('input'));"
    )
    want = F.conv2d(x[None], w, b, stride=2, padding=2)[0]
    K, Ho, Wo = want.shape
    assert conv_matches(x, w, b, 2, 2) == (K - 1, Ho - 1, Wo - 1)
    shown = [[[int(text(f"o-{k}-{i}-{j}")) for j in range(Wo)] for i in range(Ho)] for k in range(K)]
    assert np.array_equal(shown, want.numpy())

    # CS231n's example: its own setting (stride 2, padding 1, output 3x3x2) and the slides' worked answer
    Select(browser.find_element(By.ID, "example")).select_by_value("1")
    ex = numeric_example()
    xc, wc, bc = (torch.from_numpy(a).double() for a in (ex.x, ex.weight, ex.bias))
    assert size_shown(xc, wc, 2, 1) and data("conv-size", "ho") == 3
    assert conv_matches(xc, wc, bc, 2, 1) == (0, 0, 0)
    for step in range(1, 12):  # through the first map (bias 1) into the second (bias 0)
        click("conv-step")
        assert conv_matches(xc, wc, bc, 2, 1) == (step // 9, step % 9 // 3, step % 3)
    assert int(text("conv-value")) == ex.out[1, 0, 2]
    _shot(browser.find_element(By.ID, "conv"), "conv-page-cs231n.png", tmp_path)

    # max pooling of the scene's ReLU'd map 1 (horizontal edge) at stride 1, padding 1
    Select(browser.find_element(By.ID, "example")).select_by_value("0")
    Select(browser.find_element(By.ID, "pool-map")).select_by_value("1")
    relu = F.relu(F.conv2d(x[None], w, b, stride=1, padding=1))
    pooled = F.max_pool2d(relu, 2, 2)[0]
    assert (data("pool-size", "ho"), data("pool-size", "wo")) == tuple(pooled.shape[1:]) == (3, 3)
    for step in range(5):
        k, i, j = (data("pool-current", key) for key in "kij")
        assert (k, i, j) == (1, step // 3, step % 3)
        assert int(text("pool-value")) == pooled[k, i, j] and text(f"p-{i}-{j}") == text("pool-value")
        window = relu[0, k, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten().tolist()
        assert [float(v) for v in text("pool-window").split(", ")] == window
        click("pool-step")
    _shot(browser.find_element(By.ID, "pool"), "conv-page-pool.png", tmp_path)

    click("conv-play")  # playing moves the window on its own, and pauses
    WebDriverWait(browser, 10).until(lambda d: data("conv-current", "j") > 0)
    click("conv-play")
    assert browser.find_element(By.ID, "conv-play").get_attribute("aria-pressed") == "false"

    html = browser.find_element(By.TAG_NAME, "html")
    assert html.get_attribute("data-images") == "2/2" and html.get_attribute("data-errors") == "0"
    assert html.get_attribute("data-mismatches") is None  # every sum of products agreed with Python's number
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
    unlabeled = browser.execute_script(
        "return Array.from(document.querySelectorAll('select, input')).filter(e => !e.labels.length).map(e => e.id)"
    )
    assert unlabeled == []  # every control has a label a screen reader can read
    assert conv_shot.stat().st_size < 400_000
