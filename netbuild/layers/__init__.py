"""The layer registry: one class per YAML ``type`` name, each in its family's module."""

from __future__ import annotations

from ..errors import expected_one_of
from .activation import Activation
from .attention import MultiHeadAttention, PositionalEmbedding
from .base import ActivatedLayer, Context, Layer, LayerError, ParamSpec
from .conv import (
    Conv1D,
    Conv1DTranspose,
    Conv2D,
    Conv2DTranspose,
    DepthwiseConv2D,
    SeparableConv2D,
)
from .dense import Dense
from .embedding import Embedding
from .masking import Masking
from .merge import Add, Concatenate, Multiply
from .noise import Dropout
from .normalization import BatchNorm, LayerNorm
from .pool import (
    AvgPool1D,
    AvgPool2D,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool1D,
    MaxPool2D,
)
from .recurrent import GRU, LSTM, SimpleRNN
from .resample import Upsampling1D, Upsampling2D
from .shape import Cropping1D, Cropping2D, Flatten, Permute, Reshape, ZeroPadding1D, ZeroPadding2D

REGISTRY: dict[str, type[Layer]] = {
    cls.type: cls
    for cls in (
        Dense, Activation, Dropout, Flatten, Reshape, Permute,
        ZeroPadding1D, ZeroPadding2D, Cropping1D, Cropping2D, Upsampling1D, Upsampling2D,
        BatchNorm, LayerNorm, Embedding,
        Conv1D, Conv2D, Conv1DTranspose, Conv2DTranspose, DepthwiseConv2D, SeparableConv2D,
        MaxPool1D, MaxPool2D, AvgPool1D, AvgPool2D, GlobalMaxPool, GlobalAvgPool,
        SimpleRNN, LSTM, GRU,
        Add, Multiply, Concatenate,
        MultiHeadAttention, PositionalEmbedding, Masking,
    )
}


def get(name: str) -> type[Layer]:
    """The layer class for a YAML ``type`` name."""
    if name not in REGISTRY:
        raise KeyError(f"unknown layer type '{name}'; {expected_one_of(name, REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "get", "Layer", "ActivatedLayer", "Context", "LayerError", "ParamSpec"]
