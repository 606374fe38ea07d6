"""Declared inputs: what a task's model takes, as written in its ``task.yaml`` (``input:``).

One declaration configures both ends of the wire: the tier's decoder
(:func:`cascade.contract.decoders.decoder_for`) validates a request against it, and the runner
turns the decoded value into the graph's tensor (:mod:`cascade.runners.prepare`). The manifest
stores it, so serving needs nothing but the manifest.

Kinds::

    image     photos (PNG/JPEG, base64) or camera arrays; resized to ``size`` [H, W],
              ``channels`` 1 or 3, pixels 0..255 times ``scale``, minus ``mean``, over ``std``
              (per channel), laid out ``nchw``, ``nhwc`` or ``flat`` (one vector per image)
    tensor    a nested list of exactly ``shape`` (no batch dimension) and ``dtype``
    features  a float vector of ``length`` values, optionally ``names``: a list or a
              name -> value object
    text      a string; the tokenizer (e.g. TF-IDF) is inside the ONNX graph
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

__all__ = [
    "TENSOR_DTYPES",
    "FeaturesInput",
    "ImageInput",
    "InputSpec",
    "TensorInput",
    "TextInput",
    "graph_input_shape",
]

TensorDtype = Literal["float32", "float64", "int64", "int32", "uint8"]
TENSOR_DTYPES: dict[str, str] = {
    "float32": "tensor(float)", "float64": "tensor(double)", "int64": "tensor(int64)",
    "int32": "tensor(int32)", "uint8": "tensor(uint8)",
}
"""Declared dtype -> the ONNX graph's input type string (as onnxruntime reports it)."""


class _Declared(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageInput(_Declared):
    """A picture: any photo or raw array in, ``size`` x ``channels`` normalised tensor out."""

    kind: Literal["image"]
    size: tuple[PositiveInt, PositiveInt] = Field(description="[height, width] the model takes")
    channels: Literal[1, 3] = Field(3, description="1: grey, 3: RGB")
    layout: Literal["nchw", "nhwc", "flat"] = Field(
        "nchw", description="graph input [N,C,H,W], [N,H,W,C], or [N, H*W*C] (row-major HWC)")
    scale: float = Field(1.0, gt=0, description="multiplies the 0..255 pixel values first")
    mean: tuple[float, ...] | None = Field(None, description="per channel, subtracted after scale")
    std: tuple[float, ...] | None = Field(None, description="per channel, divides after mean")
    max_bytes: PositiveInt = Field(2 * 1024 * 1024, description="largest encoded photo accepted")
    max_side: PositiveInt = Field(4096, description="largest photo or array side accepted")

    @model_validator(mode="after")
    def _per_channel(self) -> ImageInput:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, self.channels):
                raise ValueError(
                    f"{name} has {len(values)} values; give 1 or one per channel ({self.channels})")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be > 0")
        return self


class TensorInput(_Declared):
    """A raw tensor of a fixed ``shape`` (without the batch dimension) and ``dtype``."""

    kind: Literal["tensor"]
    shape: tuple[PositiveInt, ...] = Field(min_length=1, description="e.g. [3, 32] (no batch)")
    dtype: TensorDtype = "float32"


class FeaturesInput(_Declared):
    """A float vector of ``length`` values; ``names`` lets clients send a name -> value object."""

    kind: Literal["features"]
    length: PositiveInt
    names: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _names_match(self) -> FeaturesInput:
        if self.names is not None:
            if len(self.names) != self.length:
                raise ValueError(f"names has {len(self.names)} entries; length is {self.length}")
            if len(set(self.names)) != len(self.names):
                raise ValueError("names must be unique")
        return self


class TextInput(_Declared):
    """A text; the graph does its own tokenizing (string input [N, 1])."""

    kind: Literal["text"]
    max_chars: PositiveInt | None = Field(None, description="default: the tier's max_text_chars")


InputSpec = Annotated[ImageInput | TensorInput | FeaturesInput | TextInput,
                      Field(discriminator="kind")]
"""One declared input (pydantic picks the model by ``kind``)."""


def graph_input_shape(spec: ImageInput | TensorInput | FeaturesInput | TextInput,
                      ) -> tuple[int, ...]:
    """The shape of one sample as the graph takes it (the batch dimension left out)."""
    if isinstance(spec, ImageInput):
        (height, width), c = spec.size, spec.channels
        return {"nchw": (c, height, width), "nhwc": (height, width, c),
                "flat": (height * width * c,)}[spec.layout]
    if isinstance(spec, TensorInput):
        return spec.shape
    if isinstance(spec, FeaturesInput):
        return (spec.length,)
    return (1,)
