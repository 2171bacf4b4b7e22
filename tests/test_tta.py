"""Test-time augmentation equals the weighted mean of the explicitly transformed images' logits."""

import pytest
import torch

from cnnlab.errors import ConfigError
from cnnlab.inference.tta import TTA_LEVELS, tta_logits, tta_views
from cnnlab.models import create_model


def _reflect(i: int, n: int) -> int:
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def _translated(x, dy, dx):
    """out[..., i, j] = x[..., i + dy, j + dx], mirrored at the border without repeating the edge pixel."""
    h, w = x.shape[-2:]
    rows = torch.tensor([_reflect(i + dy, h) for i in range(h)])
    cols = torch.tensor([_reflect(j + dx, w) for j in range(w)])
    return x.index_select(2, rows).index_select(3, cols)


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = create_model("convnet").eval()  # any model: TTA is model-agnostic
    return model, torch.randn(3, 3, 32, 32)


def test_views_and_weights_are_the_papers():
    assert [tuple(v) for v in tta_views(2)] == [
        (0.25, False, 0, 0),
        (0.25, True, 0, 0),
        (0.125, False, -1, -1),
        (0.125, True, -1, -1),
        (0.125, False, 1, 1),
        (0.125, True, 1, 1),
    ]
    assert all(sum(v.weight for v in views) == 1.0 for views in TTA_LEVELS.values())
    with pytest.raises(ConfigError, match="TTA level 3 is invalid"):
        tta_views(3)


@torch.no_grad()
def test_tta_equals_the_weighted_mean_of_explicit_views(model_and_batch):
    model, x = model_and_batch
    plain, mirror = model(x), model(x.flip(3))
    up_left, down_right = _translated(x, -1, -1), _translated(x, 1, 1)
    assert torch.equal(up_left[:, :, 1:, 1:], x[:, :, :-1, :-1])  # content moved one pixel down and right
    assert torch.equal(up_left[:, :, 0, 1:], x[:, :, 1, :-1])  # row -1 reflected to row 1
    torch.testing.assert_close(tta_logits(model, x, 0), plain)
    torch.testing.assert_close(tta_logits(model, x, 1), (plain + mirror) / 2)
    translated = [model(up_left), model(up_left.flip(3)), model(down_right), model(down_right.flip(3))]
    expected = 0.25 * plain + 0.25 * mirror + 0.125 * sum(translated)
    torch.testing.assert_close(tta_logits(model, x, 2), expected)


@torch.no_grad()
def test_tta_keeps_channels_last_and_works_under_autocast(model_and_batch):
    model, x = model_and_batch
    reference = tta_logits(model, x, 2)
    seen = []
    hook = model[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    fast = model.to(memory_format=torch.channels_last)
    try:
        out = tta_logits(fast, x.contiguous(memory_format=torch.channels_last), 2)
        assert seen == [True] * 6  # every view reaches the model in the caller's layout
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tta_logits(fast, x.contiguous(memory_format=torch.channels_last), 2)
        assert low.dtype == torch.float32
        assert (low - reference).norm() <= 0.03 * reference.norm()  # bf16's tolerance in test_models.py
    finally:
        hook.remove()
        model.to(memory_format=torch.contiguous_format)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_tta_on_cuda_matches_cpu(model_and_batch):
    model, x = model_and_batch
    reference = tta_logits(model, x, 2)
    gpu = create_model("convnet").eval()
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda().to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = tta_logits(gpu, x.cuda().contiguous(memory_format=torch.channels_last), 2)
    assert (out.cpu() - reference).norm() <= 0.03 * reference.norm()
