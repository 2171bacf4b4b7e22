"""`cnnlab explain`: the page's numbers against torch.nn.functional on each layer's real input (captured here by
hooks of the test's own), its probabilities against `cnnlab predict`, its size budget, and the page in a real
headless Chromium (no request leaves it, a click on a unit shows the expected numbers)."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_viz_page import _shot, browser  # noqa: F401  (the headless Chromium fixture and screenshots)

from cnnlab.cli import main
from cnnlab.errors import ConfigError
from cnnlab.inference.predict import load_image, predict_files
from cnnlab.inference.weights import load_weights, save_weights
from cnnlab.models import create_model
from cnnlab.viz.explain import explain_data, explain_files, explain_html, write_explain_page


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    """One cnnlab cache for this module: inference measures the CPU once, not per test."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _shared_cache(private_cache, probe_cache, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(probe_cache))


def weights_folder(folder: Path, name: str, classes=10, shape=(3, 32, 32), **args) -> Path:
    """Random-weight model files as `cnnlab train` writes them (BN statistics made non-trivial)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, **args)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(
        model,
        folder / "model.safetensors",
        {
            "model": name,
            "model_args": {"num_classes": classes, **args},
            "classes": [f"class {i}" for i in range(classes)],
            "mean": [0.5] * shape[0],
            "std": [0.25] * shape[0],
            "input_shape": list(shape),
        },
    )
    return folder


def image_files(folder: Path, n: int, size=(40, 36), seed=0) -> list[Path]:
    """Smooth pictures (blobs on a gradient): they compress as photographs do, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    paths = []
    for k in range(n):
        img = np.zeros((size[1], size[0], 3))
        for c in range(3):
            cy, cx = rng.uniform(0, size[1]), rng.uniform(0, size[0])
            img[..., c] = 60 + 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(20, 80)))
        paths.append(folder / f"picture{k}.png")
        Image.fromarray(img.astype(np.uint8)).save(paths[-1])
    return paths


def decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def real_io(model, x) -> dict:
    """Each top-level layer's input and output, captured here independently of the page's own tracing."""
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0].clone(), output.clone()))

        return hook

    model.requires_grad_(False)  # plain numbers from here on
    hooks = [m.register_forward_hook(keep(name)) for name, m in model.named_children()]
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def convnet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    folder = weights_folder(tmp / "convnet", "convnet")
    paths = image_files(tmp / "images", 8)
    loaded = load_weights(folder)
    data = explain_files(loaded, paths)
    page = write_explain_page(tmp / "explain.html", data)
    return folder, paths, loaded, data, page


def test_page_numbers_equal_pytorch_on_each_layers_real_input(convnet):
    folder, paths, loaded, data, _ = convnet
    pixels = np.stack([load_image(p, loaded.preprocess)[0] for p in paths])
    x = loaded.normalise(torch.from_numpy(pixels))
    model = create_model("convnet")
    model.load_state_dict(loaded.model.state_dict())
    io = real_io(model, x)
    layers = {layer["id"]: layer for layer in data["layers"]}
    assert [layers[k]["kind"] for k in ("0", "1", "2", "3", "4", "5", "10", "12")] == [
        "conv",
        "act",
        "conv",
        "act",
        "pool",
        "conv",
        "linear",
        "linear",
    ]
    for b, im in enumerate(data["images"]):
        for name in ("0", "2", "5", "7"):  # every conv: the stored maps are F.conv2d of the layer's real input
            conv = model[int(name)]
            xin, _ = io[name]
            want = F.conv2d(xin, conv.weight, conv.bias, padding=1)[b]
            got = decode(im["acts"][name]).reshape(want.shape)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
            assert np.array_equal(decode(layers[name]["weight"]), conv.weight.detach().numpy().ravel())
        pooled = F.max_pool2d(io["4"][0], 2, 2)[b]
        assert np.array_equal(decode(im["acts"]["4"]).reshape(pooled.shape), pooled.numpy())
    assert layers["5"]["src"] == "4" and layers["0"]["src"] == "input"  # each conv reads its real input
    assert data["cap"] == 8 and "Every map of every layer is shown" in data["note"]


def test_probabilities_equal_predicts(convnet):
    folder, paths, loaded, data, _ = convnet
    results, bad = predict_files(load_weights(folder), paths, top_k=10, precision="fp32")
    assert not bad
    for result, im in zip(results, data["images"]):
        assert Path(result["file"]).name == im["name"]
        for top in result["top"]:
            assert im["probs"][top["index"]] == pytest.approx(top["probability"], abs=1e-6)
        assert im["pred"] == result["top"][0]["index"]


def test_convnet_on_8_images_fits_the_budget_and_is_self_contained(convnet):
    page = convnet[4].read_text()
    assert len(page.encode()) <= 5_000_000, len(page.encode())
    page = page.replace("'http://www.w3.org/2000/svg'", "")  # the SVG namespace: a name, never fetched
    assert "http://" not in page and "https://" not in page and "<link" not in page and "{{" not in page
    assert "default-src 'none'" in page
    data = convnet[3]
    assert len(data["images"]) == 8 and all(len(im["cams"]) == 10 for im in data["images"])


def test_a_larger_model_shows_fewer_maps_and_says_so(tmp_path):
    folder = weights_folder(tmp_path / "resnet20", "resnet20")
    paths = image_files(tmp_path / "images", 4)
    data = explain_files(load_weights(folder), paths, budget=2_500_000)
    page = write_explain_page(tmp_path / "r.html", data)
    assert page.stat().st_size <= 2_500_000
    assert data["cap"] < 64 and f"show their first {data['cap']}" in data["note"]
    blocks = [layer for layer in data["layers"] if layer["kind"] == "block"]
    assert [b["id"] for b in blocks] == [f"layer{s}.{k}" for s in (1, 2, 3) for k in range(3)]
    assert blocks[0]["shortcut"] == "identity" and blocks[3]["shortcut"] == "layer2.0.downsample"
    assert data["columns"][:3] == ["conv1", "bn1", "relu"] and "layer1.0.conv1" not in data["columns"]
    assert data["cam_layer"] == "layer3"
    # a convolution whose input maps are not all on the page: the rest's share, from PyTorch, completes the sum
    conv = {layer["id"]: layer for layer in data["layers"]}["layer1.0.conv2"]
    assert conv["held"] == data["cap"] < 16
    with pytest.raises(
        ConfigError,
        match=r"4 image\(s\) of resnet20 need .* MB even with one map per layer, over the "
        r"page budget of 0.5 MB: give fewer images or --budget-mb",
    ):
        explain_files(load_weights(folder), paths, budget=500_000)


def test_cli_explain_files_and_the_runs_test_images(tmp_path, capsys, image_folder):
    folder = weights_folder(tmp_path / "w", "convnet")
    paths = image_files(tmp_path / "images", 2)
    code = main(["explain", str(folder), *map(str, paths), "--out", str(tmp_path / "page.html")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(str(tmp_path / "page.html")) and "2 image(s)" in out
    code = main(["explain", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "not a run folder, so there are no test images to pick" in err
    code = main(["explain", str(folder), str(paths[0]), "--layer", "nope", "--out", str(tmp_path / "x.html")])
    err = capsys.readouterr().err
    assert code == 2 and "no layer 'nope' for Grad-CAM" in err

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "imagefolder",
                "--data-dir",
                str(image_folder),
                "--model",
                "cnn",
                "--model-arg",
                "spec=c4,p,f16",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--run-dir",
                str(run),
                "--progress",
                "plain",
                "--no-report",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = main(["explain", str(run), "--count", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads((run / "explain.html").read_text().split('type="application/json">')[1].split("</script>")[0])
    names = [im["name"] for im in data["images"]]
    assert len(names) == 4 and all(n.startswith("test image ") for n in names)
    right = [im["label"] == im["pred"] for im in data["images"]]
    assert right.count(False) <= 2  # at most half wrong; right ones fill the rest


# ---------------------------------------------------------------------------------------------- in a browser


def _open(browser, page):  # noqa: F811  (the imported fixture's driver)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page.resolve().as_uri())
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "html").get_attribute("data-ready"))


def test_page_in_a_real_headless_browser(browser, convnet, tmp_path):  # noqa: F811  (the imported fixture)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    folder, paths, loaded, data, page = convnet
    _open(browser, page)
    html = browser.find_element(By.TAG_NAME, "html")
    # nothing fetched: every picture is a data: URI, and the browser recorded no network resource at all
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources == []
    assert html.get_attribute("data-errors") == "0"

    pixels = np.stack([load_image(p, loaded.preprocess)[0] for p in paths])
    x = loaded.normalise(torch.from_numpy(pixels))
    model = create_model("convnet")
    model.load_state_dict(loaded.model.state_dict())
    io = real_io(model, x)
    value = lambda id_: float(browser.find_element(By.ID, id_).get_attribute("data-value"))  # noqa: E731

    # hover: the second conv's map is linked to every map of the ReLU before it
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "map-2-3")).perform()
    assert html.get_attribute("data-links") == "5"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#overview canvas.linked")) == 5

    # click a unit of conv "5" (after the pooling), then pick a pixel: the numbers are PyTorch's
    browser.find_element(By.ID, "map-5-6").click()
    detail = browser.find_element(By.ID, "detail-section")
    assert detail.is_displayed() and detail.get_attribute("data-layer") == "5"
    for i, j in [(0, 0), (7, 9), (15, 15)]:
        row, col = browser.find_element(By.ID, "pixel-row"), browser.find_element(By.ID, "pixel-col")
        browser.execute_script(
            "arguments[0].value = arguments[2]; arguments[1].value = arguments[3];"
            "arguments[1].dispatchEvent(new Event('change'));",
            row,
            col,
            i,
            j,
        )
        assert (int(detail.get_attribute("data-i")), int(detail.get_attribute("data-j"))) == (i, j)
        xin = io["5"][0][0]
        conv = model[5]
        want = F.conv2d(xin[None], conv.weight, conv.bias, padding=1)[0, 6, i, j].item()
        products = F.conv2d(xin[None], conv.weight, None, padding=1)[0, 6, i, j].item()
        assert value("detail-value") == pytest.approx(want, abs=1e-5)
        assert value("detail-sum") == pytest.approx(products, abs=1e-5)
        assert value("detail-bias") == pytest.approx(conv.bias[6].item(), abs=1e-7)
        assert value("detail-stored") == pytest.approx(want, abs=1e-5)
        window = F.pad(xin, (1, 1, 1, 1))[0, i : i + 3, j : j + 3]  # input map 0 under the kernel, zero-padded
        assert value("channel-sum-0") == pytest.approx((window * conv.weight[6, 0]).sum().item(), abs=1e-5)
        shown = browser.find_element(By.ID, "detail-value").text
        assert abs(float(shown) - want) <= 5e-5  # what a reader sees, to 4 decimals
    _shot(browser.find_element(By.ID, "detail-section"), "explain-detail.png", tmp_path)

    # max pooling: the window's maximum
    browser.find_element(By.ID, "map-4-2").click()
    pooled = F.max_pool2d(io["4"][0], 2, 2)
    i, j = int(detail.get_attribute("data-i")), int(detail.get_attribute("data-j"))
    assert value("detail-value") == pytest.approx(pooled[0, 2, i, j].item(), abs=1e-6)
    assert browser.find_element(By.ID, "detail-body").get_attribute("data-kind") == "pool"

    # the dense head: logits and softmax, the probabilities of predict
    browser.execute_script("cnnlabExplain.open('12', 0, 3, 0)")
    assert "logits and softmax" in browser.find_element(By.ID, "detail-body").text
    assert value("prob-" + str(data["images"][0]["pred"])) == pytest.approx(max(data["images"][0]["probs"]))

    # another image, another class for Grad-CAM
    browser.find_element(By.ID, "thumb-3").click()
    assert html.get_attribute("data-image") == "3"
    from selenium.webdriver.support.select import Select

    Select(browser.find_element(By.ID, "cam-class")).select_by_value("4")
    assert browser.find_element(By.ID, "cam-img").get_attribute("src") == data["images"][3]["cams"]["4"]
    _shot(browser.find_element(By.ID, "overview-section"), "explain-overview.png", tmp_path)
    _shot(browser.find_element(By.ID, "cam-section"), "explain-cam.png", tmp_path)
    assert html.get_attribute("data-mismatches") is None  # every sum the page redid agreed with PyTorch's
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_resnet_blocks_open_with_the_shortcut_drawn(browser, tmp_path):  # noqa: F811  (the imported fixture)
    from selenium.webdriver.common.by import By

    folder = weights_folder(tmp_path / "resnet20", "resnet20")
    data = explain_files(load_weights(folder), image_files(tmp_path / "images", 2))
    page = write_explain_page(tmp_path / "r.html", data)
    _open(browser, page)
    browser.find_element(By.ID, "open-layer2.0").click()
    section = browser.find_element(By.ID, "block-section")
    assert section.is_displayed() and browser.find_element(By.ID, "block-name").text == "layer2.0"
    assert browser.find_elements(By.ID, "skip-path")  # the shortcut, from the block's input to the sum
    heads = [h.text for h in section.find_elements(By.CSS_SELECTOR, ".col h3")]
    assert heads == ["block input", "conv1", "bn1", "relu", "conv2", "bn2", "downsample (shortcut)", "+", "relu"]
    browser.find_element(By.ID, "map-layer2.0-1").click()
    value = lambda id_: float(browser.find_element(By.ID, id_).get_attribute("data-value"))  # noqa: E731
    assert value("detail-sum") == pytest.approx(value("detail-main") + value("detail-shortcut"), abs=1e-5)
    assert value("detail-value") == pytest.approx(max(0.0, value("detail-sum")), abs=1e-5)
    browser.find_element(By.ID, "map-layer2.0.bn1-0").click()  # batch norm, from its running statistics
    assert browser.find_element(By.ID, "detail-body").get_attribute("data-kind") == "bn"
    _shot(section, "explain-block.png", tmp_path)
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("data-mismatches") is None


@pytest.mark.parametrize(
    "name,shape,args",
    [
        ("lenet5", (1, 32, 32), {}),
        ("airbench94", (3, 32, 32), {}),
        ("resnet18", (3, 64, 64), {}),
        ("cnn", (3, 32, 32), {"spec": "c8b,p,c16s2,a,f32,d0.5"}),
        ("alexnet", (3, 224, 224), {}),
    ],
)
def test_every_family_gets_a_page_with_its_arithmetic(tmp_path, name, shape, args):
    folder = weights_folder(tmp_path / name, name, shape=shape, **args)
    loaded = load_weights(folder)
    rng = np.random.default_rng(0)
    data = explain_data(loaded, [rng.integers(0, 256, shape, dtype=np.uint8)], ["noise"])
    kinds = {layer["id"]: layer["kind"] for layer in data["layers"]}
    convs = [n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    # every plain convolution is recognised (checked against F.conv2d on its real input); custom ones may not be
    custom = {"c3"} if name == "lenet5" else set()  # LeNet-5's C3 sums convolutions over a connection table
    assert all(kinds.get(c) == "conv" for c in convs if c not in custom and not c.startswith("c3.")), kinds
    assert data["columns"] and data["images"][0]["cams"] and sum(data["images"][0]["probs"]) == pytest.approx(1)
    assert len(explain_html(data).encode()) <= 5_000_000
    if name == "resnet18":
        assert [c for c in data["columns"] if c.startswith("layer")] == [
            f"layer{s}.{k}" for s in (1, 2, 3, 4) for k in (0, 1)
        ]
