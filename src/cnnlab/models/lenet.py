"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document recognition",
Proc. IEEE 1998, Fig. 2): C1 6@5x5, S2 2x2, C3 16@5x5, S4 2x2, C5 120@5x5, F6 84, 10 outputs, on 32x32 inputs.

The default is the modern form: ReLU, max pooling, a linear output layer, C3 connected to all six S2 maps.
`activation="lecun_tanh", pool="avg", connection_table=True` comes closer to the paper, whose S-layers also
had a trainable gain and bias per map and whose output was a layer of Euclidean RBF units (not kept here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import ModelError
from .registry import register_model

__all__ = ["LeNet5", "ConnectionTableConv", "LENET5_C3_TABLE", "lenet5"]

# Table I of the paper: the S2 maps (0-5) each C3 map reads. Maps 0-5 read three neighbouring maps,
# 6-11 four neighbouring, 12-14 four non-neighbouring and 15 all six, "to break the symmetry" (Sec. II-B).
LENET5_C3_TABLE = (
    (0, 1, 2),
    (1, 2, 3),
    (2, 3, 4),
    (3, 4, 5),
    (0, 4, 5),
    (0, 1, 5),
    (0, 1, 2, 3),
    (1, 2, 3, 4),
    (2, 3, 4, 5),
    (0, 3, 4, 5),
    (0, 1, 4, 5),
    (0, 1, 2, 5),
    (0, 1, 3, 4),
    (1, 2, 4, 5),
    (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


class LeCunTanh(nn.Module):
    """f(a) = 1.7159 tanh(2a/3), the paper's squashing function (Appendix A): f(1) = 1, f(-1) = -1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "tanh": nn.Tanh,
    "lecun_tanh": LeCunTanh,
}
_POOLS: dict[str, Callable[..., nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class ConnectionTableConv(nn.Module):
    """A convolution in which output map j reads only the input maps `table[j]`.

    Absent connections hold no weights: the maps with the same number of inputs form one grouped conv over
    their inputs gathered side by side, so `parameters()` counts exactly the table's kernels and biases.
    """

    order: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, table, kernel_size: int, in_channels: int):
        super().__init__()
        table = [tuple(int(i) for i in row) for row in table]
        for j, row in enumerate(table):
            if not row or len(set(row)) != len(row) or not all(0 <= i < in_channels for i in row):
                raise ModelError(f"connection table row {j} = {row}: needs distinct input maps in 0..{in_channels - 1}")
        self.table, self.in_channels, self.out_channels = table, in_channels, len(table)
        fan_ins = sorted({len(row) for row in table})
        self.convs = nn.ModuleList()
        produced: list[int] = []  # output map of each conv output channel, in concatenation order
        for k, fan_in in enumerate(fan_ins):
            maps = [j for j, row in enumerate(table) if len(row) == fan_in]
            gather = [i for j in maps for i in table[j]]  # group g reads channels gather[g*fan_in:(g+1)*fan_in]
            self.register_buffer(f"gather{k}", torch.tensor(gather), persistent=False)
            self.convs.append(nn.Conv2d(len(gather), len(maps), kernel_size, groups=len(maps)))
            produced += maps
        # concatenation order -> table order (the identity when maps with equal fan-in are contiguous, as in LeNet-5)
        self.register_buffer("order", torch.tensor(produced).argsort(), persistent=False)
        self._reorder = produced != sorted(produced)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [conv(x.index_select(1, getattr(self, f"gather{k}"))) for k, conv in enumerate(self.convs)]
        out = torch.cat(outs, 1)
        return out.index_select(1, self.order) if self._reorder else out


class LeNet5(nn.Module):
    """C1-S2-C3-S4-C5-F6-output; inputs smaller than 32x32 are zero-padded to 32x32 (MNIST: 2 pixels a side).

    Larger inputs are used as they are: C5 then gives more than 1x1 positions and F6 reads all of them.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = 32,
        activation: str = "relu",
        pool: str = "max",
        connection_table: bool = False,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS or pool not in _POOLS:
            raise ModelError(
                f"activation {activation!r} / pool {pool!r}: choose activation from "
                f"{', '.join(_ACTIVATIONS)} and pool from {', '.join(_POOLS)}"
            )
        if num_classes < 1 or in_channels < 1:
            raise ModelError(f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
        h, w = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
        if h < 1 or w < 1:
            raise ModelError(f"input_size {input_size!r} must be positive")
        # The paper centres the 28x28 digits in a 32x32 field "so that potential distinctive features such as
        # stroke end-points or corner can appear in the center of the receptive field" of the top detectors.
        ph, pw = max(32 - h, 0), max(32 - w, 0)
        self.pad = nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h5, w5 = (h + ph) // 4 - 7, (w + pw) // 4 - 7  # 32 -> C1 28 -> S2 14 -> C3 10 -> S4 5 -> C5 1
        act = _ACTIVATIONS[activation]
        self.c1 = nn.Conv2d(in_channels, 6, 5)
        self.act1 = act()
        self.s2 = _POOLS[pool](2, 2)
        self.c3 = ConnectionTableConv(LENET5_C3_TABLE, 5, 6) if connection_table else nn.Conv2d(6, 16, 5)
        self.act3 = act()
        self.s4 = _POOLS[pool](2, 2)
        self.c5 = nn.Conv2d(16, 120, 5)  # "a convolutional layer" in the paper: 5x5 kernels over all 16 S4 maps
        self.act5 = act()
        self.f6 = nn.Linear(120 * h5 * w5, 84)
        self.act6 = act()
        self.output = nn.Linear(84, num_classes)
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, (h, w)
        self.activation, self.pool, self.connection_table = activation, pool, connection_table

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pad(x)  # (N, C, 28, 28) -> (N, C, 32, 32)
        x = self.s2(self.act1(self.c1(x)))  # -> (N, 6, 14, 14)
        x = self.s4(self.act3(self.c3(x)))  # -> (N, 16, 5, 5)
        return self.act5(self.c5(x))  # -> (N, 120, 1, 1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.act6(self.f6(torch.flatten(x, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def lenet5(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | tuple[int, int] = 32,
    activation: str = "relu",
    pool: str = "max",
    connection_table: bool = False,
) -> LeNet5:
    """LeNet-5 (LeCun et al. 1998, Fig. 2) in its modern form: 61,706 parameters at 1x32x32, 10 classes."""
    return LeNet5(
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        activation=activation,
        pool=pool,
        connection_table=connection_table,
    )
