"""Streamed batches for channels_last models: the workers write (N, H, W, C) and the main process normalises
them as flat rows; the batches equal the NCHW ones bit for bit, also after a loader switches layout."""

import torch
from conftest import write_image_folder

from cnnlab.data.stream import FolderStreamLoader, open_image_folder


def _batches(source, workers, channels_last, train=True, switch_to=None):
    loader = FolderStreamLoader(
        source,
        "train" if train else "test",
        8,
        image_size=20,
        mean=[0.5, 0.4, 0.3],
        std=[0.2, 0.25, 0.3],
        workers=workers,
        channels_last=channels_last,
        train=train,
        seed=3,
    )
    if switch_to is not None:  # as a run does when its own model's probe picks the other memory format
        loader.use_channels_last(switch_to)
    try:
        return [(x.clone(), y.clone(), x.is_contiguous(memory_format=torch.channels_last)) for x, y in loader]
    finally:
        loader.close()


def test_channels_last_batches_equal_nchw_batches_bitwise(tmp_path):
    source = open_image_folder(write_image_folder(tmp_path / "f", per_class=(12, 4), size=24))
    for workers in (0, 2):
        for train in (True, False):
            nchw = _batches(source, workers, False, train)
            nhwc = _batches(source, workers, True, train)
            switched = _batches(source, workers, False, train, switch_to=True)
            assert len(nchw) == len(nhwc) == len(switched) > 0
            for (a, ya, _), (b, yb, b_last), (c, yc, c_last) in zip(nchw, nhwc, switched):
                assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(ya, yb) and torch.equal(ya, yc)
                assert b_last and c_last and a.is_contiguous()
