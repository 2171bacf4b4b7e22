import pytest
import torch

from cnnlab.models import create_model
from cnnlab.training.optim import build_optimizer, build_schedule, param_groups


def test_no_weight_decay_on_biases_and_norms():
    model = create_model("cnn", spec="c8b,p,f16")
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert {id(p) for p in no_decay["params"]} == {
        id(model[1].weight),
        id(model[1].bias),
        id(model[5].bias),
        id(model[7].bias),
    }


def test_optimizers():
    model = create_model("convnet")
    sgd = build_optimizer(model, "sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert isinstance(build_optimizer(model, "adamw", 1e-3), torch.optim.AdamW)


def test_onecycle_rises_then_falls_to_zero():
    lr_at = build_schedule("onecycle", 1.0, 100, steps_per_epoch=10)
    assert lr_at(0) == pytest.approx(0.04)
    assert lr_at(25) == pytest.approx(1.0)
    assert lr_at(99) == pytest.approx(1 / 75)
    assert max(lr_at(s) for s in range(100)) == pytest.approx(1.0)


def test_cosine_with_warmup():
    lr_at = build_schedule("cosine", 1.0, 100, steps_per_epoch=10, warmup_epochs=1)
    assert lr_at(0) == 0 and lr_at(5) == pytest.approx(0.5) and lr_at(10) == pytest.approx(1.0)
    assert lr_at(55) == pytest.approx(0.5) and lr_at(100) == pytest.approx(0.0)


def test_multistep_by_epochs_and_by_iterations():
    by_epoch = build_schedule("multistep", 0.1, 1000, steps_per_epoch=100, milestones=[5, 8])
    assert [by_epoch(s) for s in (499, 500, 800)] == pytest.approx([0.1, 0.01, 0.001])
    by_iter = build_schedule(
        "multistep", 0.1, 1000, steps_per_epoch=100, milestones=[320, 480], milestone_unit="iteration"
    )
    assert [by_iter(s) for s in (319, 320, 480)] == pytest.approx([0.1, 0.01, 0.001])


def test_fraction_milestones_scale_with_the_run_and_constant_warmup():
    full = build_schedule(
        "multistep",
        0.1,
        64_000,
        steps_per_epoch=390,
        milestones=[0.5, 0.75],
        milestone_unit="fraction",
        warmup_epochs=1.0,
        warmup_lr=0.01,
        warmup="constant",
    )
    assert [full(s) for s in (0, 389, 390, 31_999, 32_000, 48_000)] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.01, 0.001]
    )
    short = build_schedule(
        "multistep", 0.1, 7_800, steps_per_epoch=390, milestones=[0.5, 0.75], milestone_unit="fraction"
    )
    assert [short(s) for s in (3_899, 3_900, 5_850)] == pytest.approx([0.1, 0.01, 0.001])


def test_he2016_recipe():
    from cnnlab.engine import TrainConfig
    from cnnlab.training.recipes import apply_recipe

    cfg = apply_recipe(TrainConfig(model="resnet20"), "he2016")
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.max_steps) == (128, 0.1, 0.9, 1e-4, 64_000)
    assert cfg.augment == "crop:4:zero,flip" and cfg.warmup_epochs == 0
    warm = apply_recipe(TrainConfig(), "he2016", model="resnet110")
    assert (warm.warmup, warm.warmup_lr, warm.warmup_epochs) == ("constant", 0.01, 1.0)


def test_fast_recipe_is_what_the_readme_says():
    from cnnlab.engine import TrainConfig
    from cnnlab.training.recipes import apply_recipe

    cfg = apply_recipe(TrainConfig(model="resnet20"), "fast")
    assert (cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (
        128,
        "sgd",
        0.2,
        0.9,
        True,
        5e-4,
    )
    assert (cfg.schedule, cfg.lr_start_factor, cfg.lr_peak_fraction, cfg.lr_end_factor) == ("onecycle", 0.04, 0.25, 0)
    assert (cfg.label_smoothing, cfg.augment, cfg.epochs, cfg.tta, cfg.lookahead_every) == (
        0.1,
        "crop:4:reflect,flip",
        30,
        1,
        0,
    )
    assert (cfg.max_steps, cfg.warmup_epochs) == (0, 0)  # nothing that would not scale with --epochs


def test_fast_recipe_rescales_with_epochs_and_learns(image_folder, tmp_path):
    """`cnnlab train --recipe fast --epochs 4`: the one-cycle spans the 4 epochs, and resnet20 learns."""
    import csv
    import dataclasses

    from cnnlab.engine import TrainConfig, fit
    from cnnlab.training.recipes import apply_recipe

    cfg = dataclasses.replace(
        apply_recipe(TrainConfig(), "fast"),
        model="resnet20",
        dataset="imagefolder",
        data_dir=str(image_folder),
        run_dir=str(tmp_path / "run"),
        epochs=4,
        batch_size=24,
        progress="none",
        report=False,
        threads=1,
        precision="fp32",
        channels_last="off",
    )
    summary = fit(cfg, log=lambda message: None)
    assert summary["test_accuracy"] >= 0.8 and summary["test_tta"] == 1  # three classes: chance is 1/3
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    steps = summary["steps"]  # 5 an epoch; the learning rate of each epoch's last step
    lr_at = build_schedule("onecycle", 0.2, steps, steps_per_epoch=steps // 4)
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr_at(5 * e - 1) for e in (1, 2, 3, 4)])
    assert max(lr_at(s) for s in range(steps)) == pytest.approx(0.2) and float(rows[-1]["lr"]) < 0.02
