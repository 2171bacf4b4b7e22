"""The notebook-facing API: `train` returns the finished run, `open_run` reads one back, the highest-loss test
images come from the run's own predictions, and figures show themselves in a notebook."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from cnnlab.engine import Run, highest_loss_images, open_run, train
from cnnlab.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small `cnn` trained on the three-class image folder, through `cnnlab.training`."""
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("runs")
    root = write_image_folder(tmp / "shapes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNLAB_CACHE", str(tmp / "cache"))
        run = cnnlab.train(
            dataset="imagefolder",
            data_dir=str(root),
            run_dir=str(tmp / "run"),
            epochs=2,
            batch_size=16,
            optimizer="adamw",
            lr=3e-3,
            progress="none",
            model="cnn",
            model_args={"spec": "c8x2,p,f32"},
            augment="none",
            log=lambda m: None,
        )
    return run, root, tmp / "cache"


def test_train_returns_the_finished_run_with_what_fit_wrote(trained):
    run, _, _ = trained
    assert isinstance(run, Run) and run.path.name == "run"
    assert run.config.model == "cnn" and run.config.epochs == 2
    assert [row["epoch"] for row in run.metrics] == [1.0, 2.0]
    assert run.summary["test_accuracy"] == pytest.approx(run.metrics[-1]["test_acc"], abs=1e-4)
    assert run.classes == ["circle", "square", "stripe"]
    assert run.model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_open_run_reads_the_same_run_back(trained):
    run, _, _ = trained
    again = open_run(str(run.path))
    assert again.summary == run.summary and again.metrics == run.metrics and again.config == run.config


def test_train_refuses_an_unknown_field_naming_the_closest_one():
    with pytest.raises(ConfigError, match=r"train\(\): unknown key\(s\) 'epoch' \(did you mean 'epochs'\?\)"):
        train(epoch=3)


def test_open_run_of_a_folder_that_is_no_finished_run_says_so(tmp_path):
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    with pytest.raises(CheckpointError, match="no summary.json; give a folder that a finished"):
        open_run(tmp_path)


def test_highest_loss_images_are_the_top_losses_with_their_pixels(trained, monkeypatch):
    run, root, cache = trained
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    saved = run.predictions()
    worst = highest_loss_images(run, k=5)
    assert worst["losses"].tolist() == sorted(saved["losses"].tolist(), reverse=True)[:5]
    assert torch.equal(worst["labels"], saved["labels"][worst["indices"]])
    assert torch.equal(worst["preds"], saved["preds"][worst["indices"]])
    assert worst["images"].shape == (5, 3, 16, 16) and worst["images"].dtype == torch.uint8
    # the pixels are those of the test split's image at that index, as the image folder holds it
    from cnnlab.data import load_dataset

    data = load_dataset("imagefolder", root, log=lambda m: None)
    assert torch.equal(worst["images"], data.test_images[worst["indices"]])


def test_highest_loss_images_refuse_predictions_of_other_data(trained, tmp_path, monkeypatch):
    import shutil

    from conftest import write_image_folder

    run, _, cache = trained
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    other = write_image_folder(tmp_path / "other", per_class=(30, 7))  # another test split: 21 images, not 30
    with pytest.raises(CheckpointError, match="does not match the test split of imagefolder"):
        highest_loss_images(copy, data_dir=str(other))


def test_plot_highest_loss_titles_each_image_with_its_classes_and_loss(trained, monkeypatch):
    from cnnlab.viz.plots import plot_highest_loss

    run, _, cache = trained
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    fig = plot_highest_loss(run, k=4)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    worst = highest_loss_images(run, k=4)
    assert texts == [
        f"true {run.classes[t]}\npred {run.classes[p]}\nloss {v:.2f}"
        for t, p, v in zip(worst["labels"], worst["preds"], worst["losses"].tolist())
    ]
    assert fig.axes[0].get_title() == "The 4 test images with the highest loss"


def test_cnnlab_figures_show_themselves_as_png_in_a_notebook():
    import io

    from cnnlab.viz.figure import png_bytes, subplots

    fig, ax = subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    png = fig._repr_png_()  # what Jupyter calls to draw a cell's value
    assert png == png_bytes(fig) and Image.open(io.BytesIO(png)).format == "PNG"


def test_show_displays_figures_and_image_files_in_order(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    import IPython.display

    from cnnlab.viz.figure import png_bytes, show, subplots

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    fig, _ = subplots(figsize=(1, 1))
    frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (0, 255)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    show(fig, tmp_path / "a.gif")
    assert [o.format for o in shown] == ["png", "gif"]
    assert shown[0].data == png_bytes(fig) and shown[1].data == (tmp_path / "a.gif").read_bytes()


def test_show_refuses_what_it_cannot_display(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    from cnnlab.viz.figure import show

    with pytest.raises(ConfigError, match=r"show\(\) takes figures and .png or .gif files; got 'notes.txt'"):
        show("notes.txt")
    monkeypatch.setitem(sys.modules, "IPython.display", None)  # as without IPython
    with pytest.raises(ConfigError, match="needs IPython"):
        show(tmp_path / "a.png")


def test_step_losses_are_drawn_raw_and_as_a_trailing_mean_per_run():
    from cnnlab.viz.report import plot_step_losses

    losses = {"plain": [4.0, 2.0, 3.0, 1.0], "residual": [1.0, 1.0]}
    ax = plot_step_losses(losses, window=2).axes[0]
    raw, mean = ax.lines[0], ax.lines[1]
    assert list(raw.get_ydata()) == losses["plain"]
    assert list(mean.get_ydata()) == [4.0, 3.0, 2.5, 2.0]  # the first step averages over itself alone
    assert list(mean.get_xdata()) == [1, 2, 3, 4] and len(ax.lines) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["plain", "residual"]
    with pytest.raises(ConfigError, match="at least one run's losses"):
        plot_step_losses({})
