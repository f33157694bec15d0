"""Segmented Bezier curves in LoRA parameter space (docs/methods.md, LoRA-Curve).

M anchors theta*_1 .. theta*_M are joined by M-1 Bezier segments of degree n. Segment j has the
control points w_{jn} .. w_{jn+n}; neighbouring segments share their anchor, so a curve has
P = (M-1) n + 1 control points and anchor i is control point i n. A global t in [0, 1] maps to

    j = min(floor(t (M-1)), M-2),    tau = t (M-1) - j,
    phi(t) = sum_{k=0..n} C(n, k) tau^k (1 - tau)^(n-k) w_{jn+k}.

Every control point is a full set of LoRA factors {A_l, B_l}, stored as a dict of named tensors
(the keys of :meth:`bayeslora.backbone.Backbone.lora_parameters`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError

Weights = dict[str, torch.Tensor]


def num_control_points(num_anchors: int, degree: int) -> int:
    """P = (M - 1) n + 1."""
    return (num_anchors - 1) * degree + 1


def bernstein(degree: int, tau: float) -> list[float]:
    """b_k(tau) = C(n, k) tau^k (1 - tau)^(n - k), k = 0..n (they sum to 1)."""
    return [math.comb(degree, k) * tau**k * (1.0 - tau) ** (degree - k) for k in range(degree + 1)]


def curve_coefficients(t: float, num_anchors: int, degree: int) -> dict[int, float]:
    """The control points phi(t) mixes, as {control point index: coefficient} (n + 1 entries)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"curve parameter t must lie in [0, 1], got {t}")
    segments = num_anchors - 1
    j = min(math.floor(t * segments), segments - 1)
    tau = t * segments - j
    return {j * degree + k: b for k, b in enumerate(bernstein(degree, tau))}


def combine(points: Mapping[int, Weights] | Sequence[Weights], coefficients: dict[int, float]) -> Weights:
    """sum_i c_i w_i over the named tensors of the control points (``points[i]`` for each i)."""
    names = points[next(iter(coefficients))].keys()
    return {name: sum(c * points[i][name] for i, c in coefficients.items()) for name in names}


def interpolate(start: Weights, end: Weights, t: float) -> Weights:
    """The straight line (1 - t) start + t end."""
    return {name: (1.0 - t) * start[name] + t * end[name] for name in start}


def check_curve_shape(num_anchors: int, degree: int) -> None:
    if num_anchors < 2:
        raise ConfigError(f"a curve needs at least 2 anchors, got anchors={num_anchors}")
    if degree < 1:
        raise ConfigError(f"the Bezier degree must be >= 1, got degree={degree}")


class BezierCurve(nn.Module):
    """The P control points of a segmented Bezier curve, each a dict of named tensors.

    Control points flagged as not trainable (the frozen anchors of the anchored variant) are
    buffers; the rest are parameters. :meth:`point` is differentiable in the trainable points.
    """

    def __init__(self, points: list[Weights], num_anchors: int, degree: int, trainable: list[bool]):
        super().__init__()
        check_curve_shape(num_anchors, degree)
        if len(points) != num_control_points(num_anchors, degree) or len(trainable) != len(points):
            raise ValueError(f"{num_anchors} anchors with degree {degree} need "
                             f"{num_control_points(num_anchors, degree)} control points (and flags), "
                             f"got {len(points)} and {len(trainable)}")
        self.names = sorted(points[0])
        if any(sorted(p) != self.names for p in points):
            raise ValueError("every control point must hold the same named tensors")
        self.num_anchors, self.degree = num_anchors, degree
        self.trainable = list(trainable)
        self.points = nn.ModuleList()
        for point, train in zip(points, trainable, strict=True):
            holder = nn.Module()
            for i, name in enumerate(self.names):
                value = point[name].detach().clone()
                if train:
                    holder.register_parameter(f"w{i}", nn.Parameter(value))
                else:
                    holder.register_buffer(f"w{i}", value)
            self.points.append(holder)

    @classmethod
    def through_anchors(cls, anchors: list[Weights], degree: int, train_anchors: bool = False) -> BezierCurve:
        """Interior points of segment j on the straight line: w_{jn+k} = a_j + (k/n)(a_{j+1} - a_j).

        With these points each segment *is* the straight line (Bezier curves reproduce linear
        functions), so training starts from the piecewise-linear path through the anchors."""
        check_curve_shape(len(anchors), degree)
        points, trainable = [anchors[0]], [train_anchors]
        for a, b in zip(anchors[:-1], anchors[1:], strict=True):
            for k in range(1, degree + 1):
                points.append(b if k == degree else interpolate(a, b, k / degree))
                trainable.append(train_anchors if k == degree else True)
        return cls(points, len(anchors), degree, trainable)

    @property
    def num_points(self) -> int:
        return len(self.points)

    def control_point(self, index: int) -> Weights:
        holder = self.points[index]
        return {name: getattr(holder, f"w{i}") for i, name in enumerate(self.names)}

    def control_points(self) -> list[Weights]:
        return [self.control_point(i) for i in range(self.num_points)]

    def anchor(self, i: int) -> Weights:
        """Anchor i (0-based) = control point i n; phi(i / (M-1)) equals it exactly."""
        if not 0 <= i < self.num_anchors:
            raise IndexError(f"anchor {i} out of range: the curve has {self.num_anchors} anchors")
        return self.control_point(i * self.degree)

    def point(self, t: float) -> Weights:
        """phi(t): only the n + 1 control points of t's segment enter."""
        coefficients = curve_coefficients(t, self.num_anchors, self.degree)
        return combine({i: self.control_point(i) for i in coefficients}, coefficients)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for holder, train in zip(self.points, self.trainable, strict=True) if train
                for p in holder.parameters()]

    def values(self) -> list[Weights]:
        """Detached copies of every control point (for snapshots and state dicts)."""
        return [{k: v.detach().clone() for k, v in p.items()} for p in self.control_points()]

    def load_values(self, values: list[Weights]) -> None:
        if len(values) != self.num_points:
            raise ValueError(f"expected {self.num_points} control points, got {len(values)}")
        with torch.no_grad():
            for point, value in zip(self.control_points(), values, strict=True):
                for name, tensor in point.items():
                    tensor.copy_(value[name].to(tensor.device, tensor.dtype))
