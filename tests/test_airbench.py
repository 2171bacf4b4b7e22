"""airbench94 (Jordan 2024, arXiv 2404.00498): the net, its whitening init, the alternating flip, a short run."""

import json
import time

import pytest
import torch
import torch.nn.functional as F

from cnnlab.data import InMemoryLoader
from cnnlab.data.augment import AlternatingFlip, Compose, RandomCrop, parse_augment
from cnnlab.engine import TrainConfig, fit
from cnnlab.errors import ConfigError, ModelError
from cnnlab.models import AIRBENCH94_RECIPE, Airbench, create_model, init_whitening
from cnnlab.models.airbench import ShiftOnlyBatchNorm, airbench94_param_groups
from cnnlab.models.summary import summarize


def test_layers_parameters_and_macs_at_32x32():
    model = create_model("airbench94")
    assert isinstance(model, Airbench)
    info = summarize(model, (3, 32, 32))
    shapes = {layer["name"]: layer["output_shape"] for layer in info["layers"]}
    assert shapes["whiten"] == [1, 24, 31, 31]  # 2 * 3 * 2 * 2 filters, no padding
    assert [shapes[f"layer{i}.norm2"] for i in (1, 2, 3)] == [[1, 64, 15, 15], [1, 256, 7, 7], [1, 256, 3, 3]]
    assert (
        info["params"]
        == 24 + (24 * 64 + 64 * 64 + 64 * 256 + 3 * 256 * 256) * 9 + 2 * (64 + 256 + 256) + 2560
        == 1_971_352
    )
    # each group's first conv runs before its pool: at 31, 15 and 7 pixels; the second at 15, 7 and 3
    assert (
        info["macs"]
        == (
            24 * 31 * 31 * 3 * 4
            + 64 * 31 * 31 * 24 * 9
            + 64 * 15 * 15 * 64 * 9
            + 256 * 15 * 15 * 64 * 9
            + 256 * 7 * 7 * 256 * 9
            + 256 * 7 * 7 * 256 * 9
            + 256 * 3 * 3 * 256 * 9
            + 256 * 10
        )
        == 118_147_360
    )


def test_frozen_tensors_are_buffers_and_the_keys_are_torchs():
    model = create_model("airbench94")
    names = dict(model.named_parameters())
    assert "whiten.weight" not in names and "whiten.bias" in names
    assert not any(name.endswith(("norm1.weight", "norm2.weight")) for name in names)
    state = model.state_dict()
    assert torch.equal(state["layer2.norm1.weight"], torch.ones(256))  # the BN scale: fixed at 1, still saved
    assert state["whiten.weight"].shape == (24, 3, 2, 2) and "fc.bias" not in state
    bn = model.layer1.norm1
    assert isinstance(bn, ShiftOnlyBatchNorm) and bn.momentum == 0.4 and bn.eps == 1e-12  # paper: 0.6 in its sense
    assert torch.equal(model.layer1.conv2.weight[:, :, 1, 1], torch.eye(64))  # partial identity init


def test_global_max_pool_is_the_papers_3x3_pool_and_small_inputs_work():
    torch.manual_seed(0)
    model = create_model("airbench94").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        paper_head = model.fc(torch.flatten(F.max_pool2d(features, 3), 1)) * (1 / 9)
        assert torch.equal(model(x), paper_head)
        assert model(torch.randn(2, 3, 9, 9)).shape == (2, 10)  # 8 -> 4 -> 2 -> 1
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 3, 8, 8))


def _smooth_images(n, seed, size=16):
    """Images whose neighbouring pixels and channels are strongly correlated, as in photographs."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, size // 4, size // 4, generator=g)
    colour = torch.rand(n, 3, 1, 1, generator=g) * 0.5 + 0.5
    x = F.interpolate(low, size=size, mode="bilinear", align_corners=False) * colour
    x = x + 0.05 * torch.rand(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _patch_moment(model, images, mean, std):
    """The second-moment matrix of the whitening conv's first 12 outputs (without bias) over all positions."""
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = F.conv2d(x, model.whiten.weight[:12])
    rows = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    return rows.T @ rows / len(rows)


def test_whitening_makes_the_patch_covariance_the_identity():
    images = _smooth_images(400, seed=0)
    mean = (images.float() / 255).mean((0, 2, 3)).tolist()
    std = (images.float() / 255).std((0, 2, 3)).tolist()
    model = create_model("airbench94")
    eye = torch.eye(12, dtype=torch.float64)
    # before: the raw 2x2 patches are far from white
    raw = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    patches = raw.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    assert ((patches.T @ patches / len(patches)) - eye).abs().max() > 0.5
    eigenvalues = init_whitening(model, images, mean, std, eps=0.0)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])  # largest first, as the paper orders its filters
    assert torch.allclose(_patch_moment(model, images, mean, std), eye, atol=1e-3)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])
    # with the paper's eps, component k is scaled by sqrt(l_k / (l_k + eps)): white up to that factor
    init_whitening(model, images, mean, std)
    expected = torch.diag((eigenvalues / (eigenvalues + 5e-4)).double())
    assert torch.allclose(_patch_moment(model, images, mean, std), expected, atol=1e-3)
    # and on images it did not see, close to white
    held_out = _patch_moment(model, _smooth_images(400, seed=1), mean, std)
    assert (held_out - eye).abs().max() < 0.2


def test_whitening_uses_the_first_num_images_and_refuses_bad_input():
    images = _smooth_images(30, seed=2)
    a, b = create_model("airbench94"), create_model("airbench94")
    init_whitening(a, images, [0.5] * 3, [0.25] * 3, num_images=10)
    init_whitening(b, images[:10], [0.5] * 3, [0.25] * 3)
    assert torch.equal(a.whiten.weight, b.whiten.weight)
    with pytest.raises(ModelError, match="uint8 images of shape"):
        init_whitening(a, images.float(), [0.5] * 3, [0.25] * 3)
    with pytest.raises(ModelError, match="airbench model or a WhiteningConv"):
        init_whitening(create_model("convnet"), images, [0.5] * 3, [0.25] * 3)


def test_param_groups_give_the_papers_step_with_a_mean_loss():
    """The paper sums the per-example losses; a batch-mean loss with the rescaled groups takes the same step."""
    torch.manual_seed(0)
    batch = 8
    reference = Airbench(num_classes=3, widths=(8, 16, 16))  # narrow: the same groups, a faster test
    model = Airbench(num_classes=3, widths=(8, 16, 16))
    model.load_state_dict(reference.state_dict())
    x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 3, (batch,))
    steps = []
    for net, reduction in ((reference, "sum"), (model, "mean")):
        groups = airbench94_param_groups(net, batch_size=batch, loss_reduction=reduction)
        optimizer = torch.optim.SGD(groups, momentum=0.85, nesterov=True)
        for _ in range(3):
            loss = F.cross_entropy(net(x), y, label_smoothing=0.2, reduction=reduction)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        steps.append(groups)
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    shifts, rest = steps[1]
    assert shifts["name"] == "norm_biases" and len(shifts["params"]) == 6 and len(rest["params"]) == 8
    # at the paper's batch of 1024 and a mean loss: lr 1.5 (96 for BN shifts), decay per step 0.0153 / 7.667
    groups = airbench94_param_groups(create_model("airbench94"), batch_size=1024)
    assert groups[1]["lr"] == pytest.approx(1.5) and groups[0]["lr"] == pytest.approx(96.0)
    for group in groups:
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.0153 / (1 + 1 / 0.15))


def _identified_images(n):
    """Image i holds i in its left column and 255 - i in its right, so that a flip shows, and which image it was."""
    images = torch.zeros(n, 1, 3, 4, dtype=torch.uint8)
    images[:, 0, :, 0] = torch.arange(n, dtype=torch.uint8)[:, None]
    images[:, 0, :, 3] = 255 - torch.arange(n, dtype=torch.uint8)[:, None]
    return images


def _flips_by_epoch(loader, epochs):
    """{epoch: {image index: flipped?}} read back from the batches."""
    seen = {}
    for _ in range(epochs):
        epoch = loader.epoch
        for x, _ in loader:
            left, right = x[:, 0, 0, 0].round().long(), x[:, 0, 0, 3].round().long()
            flipped = left > right
            image = torch.where(flipped, right, left)
            seen.setdefault(epoch, {}).update(zip(image.tolist(), flipped.tolist()))
    return seen


@pytest.mark.parametrize("channels_last", [False, True])
def test_alternating_flip_flips_each_image_in_every_other_epoch(channels_last):
    n = 100
    loader = InMemoryLoader(
        _identified_images(n),
        torch.arange(n),
        16,
        mean=[0.0],
        std=[1 / 255],
        shuffle=True,
        seed=3,
        augment=parse_augment("altflip"),
        channels_last=channels_last,
    )
    seen = _flips_by_epoch(loader, 5)
    assert all(len(seen[e]) == n for e in range(5))  # every image once per epoch
    first = torch.tensor([seen[0][i] for i in range(n)])
    assert 35 <= int(first.sum()) <= 65  # epoch 0: each image at random with p = 1/2
    for e in range(1, 5):
        assert all(seen[e][i] != seen[e - 1][i] for i in range(n))  # flipped exactly when it was not before
    other_seed = InMemoryLoader(
        _identified_images(n),
        torch.arange(n),
        16,
        mean=[0.0],
        std=[1 / 255],
        shuffle=True,
        seed=4,
        augment=parse_augment("altflip"),
    )
    assert _flips_by_epoch(other_seed, 1)[0] != seen[0]  # a run's seed picks epoch 0's flips


@pytest.mark.parametrize("spec", ["altflip", "crop:1:reflect,altflip"])
def test_alternating_flip_replays_exactly_after_a_resume(spec):
    def make():
        return InMemoryLoader(
            _identified_images(60),
            torch.arange(60),
            8,
            mean=[0.0],
            std=[1 / 255],
            shuffle=True,
            drop_last=True,
            seed=5,
            augment=parse_augment(spec),
        )

    reference = make()
    seen = [x for _ in range(4) for x, _ in reference]
    interrupted = make()
    batches = [x for x, _ in interrupted]  # epoch 0 whole
    it = iter(interrupted)
    batches += [next(it)[0] for _ in range(3)]  # stopped after 3 batches of epoch 1
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    batches += [x for _ in range(3) for x, _ in resumed][: len(seen) - len(batches)]
    assert len(batches) == len(seen) and all(torch.equal(a, b) for a, b in zip(seen, batches))


def test_alternating_flip_needs_indices_and_the_epoch():
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ConfigError, match="altflip needs each image's dataset index"):
        Compose([AlternatingFlip()])(x, torch.Generator())
    out = Compose([AlternatingFlip()])(x, torch.Generator(), index=torch.arange(4), epoch=0)
    assert out.shape == x.shape
    assert parse_augment("crop:2:reflect,altflip").ops == [RandomCrop(2, "reflect"), AlternatingFlip()]
    with pytest.raises(ConfigError, match="bad augmentation 'altflip:2'"):
        parse_augment("altflip:2")


def test_the_recipe_names_what_the_engine_needs():
    assert AIRBENCH94_RECIPE["batch_size"] == 1024 and AIRBENCH94_RECIPE["epochs"] == 9.9
    assert AIRBENCH94_RECIPE["augment"] == "crop:2:reflect,altflip"
    parse_augment(AIRBENCH94_RECIPE["augment"])


def recipe_run(image_folder, run, **changes) -> TrainConfig:
    """The airbench94 recipe as `cnnlab train --recipe airbench94` sets it, shrunk to a 16x16 image folder."""
    from cnnlab.training.recipes import apply_recipe

    cfg = apply_recipe(TrainConfig(), "airbench94", batch_size=32)
    values = dict(
        dataset="imagefolder",
        data_dir=str(image_folder),
        run_dir=str(run),
        batch_size=32,
        epochs=4,
        lookahead_start_epoch=1,
        progress="none",
        report=False,
        threads=1,
    )
    values.update(changes)
    import dataclasses

    return dataclasses.replace(cfg, **values)


def test_evaluations_are_left_out_of_the_training_time_and_the_times_to_accuracy(image_folder, tmp_path, monkeypatch):
    """Evaluating every few steps to time a run must not slow the time it reports: each mid-epoch evaluation
    here sleeps 1.5 s, and none of that may show in train_seconds or in seconds_without_eval."""
    import linecache
    import sys

    import cnnlab.training.trainer as trainer

    evaluate, naps = trainer.evaluate, []

    def slow_evaluate(*args, **kwargs):
        caller = sys._getframe(2)  # evaluate_now's caller: fit, between two steps or at an epoch's end
        line = linecache.getline(caller.f_code.co_filename, caller.f_lineno)
        if caller.f_code.co_name == "fit" and "steps.paused" in "".join(
            linecache.getline(caller.f_code.co_filename, n) for n in range(caller.f_lineno - 2, caller.f_lineno)
        ):
            assert "evaluate_now()" in line
            naps.append(1.5)
            time.sleep(1.5)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    summary = fit(recipe_run(image_folder, tmp_path / "run", eval_every_steps=2, tta=0), log=lambda message: None)
    assert len(naps) == 4  # at steps 2, 4, 8 and 10 (3 steps an epoch; the epochs' ends have their own)
    # before the fix, the epochs' training seconds held every nap: at least 6 s
    assert summary["train_seconds"] < sum(naps) and summary["eval_seconds"] >= sum(naps)
    for reached in summary["time_to_accuracy"].values():
        naps_before = 1.5 * sum(step <= reached["step"] for step in (2, 4, 8, 10))
        assert 0 < reached["seconds_without_eval"] <= reached["wall_seconds"] - naps_before


def test_the_recipe_learns_on_a_small_subset_and_times_its_accuracy(image_folder, tmp_path, capsys):
    summary = fit(recipe_run(image_folder, tmp_path / "run", eval_every_steps=2), log=lambda message: None)
    assert summary["test_accuracy"] >= 0.8 and summary["test_tta"] == 2  # three classes: chance is 1/3
    assert summary["steps"] == 4 * (120 // 32)
    reached = summary["time_to_accuracy"]["0.90"]
    assert 0 < reached["wall_seconds"] <= summary["wall_seconds"] and 1 <= reached["step"] <= summary["steps"]
    evals = (tmp_path / "run" / "evals.csv").read_text().splitlines()
    assert evals[0] == "step,epochs,wall_seconds,test_loss,test_acc"
    # every 2 steps, except where an epoch ends (3 steps an epoch): that evaluation is the epoch's own
    assert [int(line.split(",")[0]) for line in evals[1:]] == [2, 4, 8, 10]
    # cnnlab eval takes the run's test-time augmentation and precision, so it repeats the run's figure
    from cnnlab.cli import main

    main(["eval", str(tmp_path / "run"), "--json"])
    evaluated = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert evaluated["tta"] == 2 and evaluated["accuracy"] == summary["test_accuracy"]
    main(["eval", str(tmp_path / "run"), "--tta", "0"])
    assert "accuracy" in capsys.readouterr().out


def test_the_recipe_with_its_lookahead_resumes_bit_for_bit(image_folder, tmp_path):
    from safetensors.torch import load_file

    from cnnlab.engine import resume_config
    from cnnlab.training.trainer import TrainingInterrupted

    fit(recipe_run(image_folder, tmp_path / "a", checkpoint_every=2), log=lambda message: None)

    def stop(state):
        state.stop_requested = state.step == 7  # after the lookahead's snapshot (epoch 1, step 5)

    with pytest.raises(TrainingInterrupted):
        fit(recipe_run(image_folder, tmp_path / "b", checkpoint_every=2), callbacks=[stop], log=lambda message: None)
    fit(resume_config(tmp_path / "b"), resume=True, log=lambda message: None)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lookahead_snapshots_then_pulls_the_weights_towards_a_slow_copy():
    from cnnlab.training.lookahead import Lookahead

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ahead = Lookahead(model, every=5, start_epoch=1, total_steps=100)
    ahead.after_step(5, epoch=0)  # before the start epoch: nothing
    assert ahead.snapshot is None
    ahead.after_step(10, epoch=1)  # the first step from the start epoch on: a snapshot, weights unchanged
    assert torch.equal(ahead.snapshot["weight"], torch.ones(1, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ahead.after_step(12, epoch=1)  # not a multiple of 5
    assert model.weight.eq(3.0).all()
    ahead.after_step(50, epoch=1)
    decay = 0.95**5 * 0.5**3
    expected = decay * 1.0 + (1 - decay) * 3.0
    assert torch.allclose(model.weight, torch.full((1, 2), expected)) and torch.equal(
        ahead.snapshot["weight"], model.weight.detach()
    )
