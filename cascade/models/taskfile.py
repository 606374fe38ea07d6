"""A task folder of the model repository and its ``task.yaml``: the schema and its reader.

Layout of a task folder (``cascade models register PATH`` reads it)::

    <task>/task.yaml        this module's :class:`TaskFile`
    <task>/<model>.onnx     one model per tier, named in task.yaml

Example ``task.yaml``::

    name: wine                       # optional: the folder's name
    input:                           # image | tensor | features | text (see contract.input_spec)
      kind: features
      length: 13
    classes: [class_0, class_1, class_2]
    tiers:                           # bottom tier first; any of endpoint, edge-node,
      endpoint: {file: endpoint.onnx}             # edge-server, cloud
      cloud: {file: cloud.onnx, quantize: false}  # runtime: onnx is the default

Every error names the file and the key path (``wine/task.yaml: input.length: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cascade import TIERS
from cascade.config_errors import validation_lines, yaml_problem
from cascade.contract.input_spec import InputSpec
from cascade.errors import RegistrationError
from cascade.models.manifest import TASK_NAME, check_tier_names
from cascade.runners.registry import runtime_names

__all__ = ["TASK_FILE", "LoadedTaskFile", "TaskFile", "TierModel", "load_task_file"]

TASK_FILE = "task.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierModel(_Strict):
    """One tier's model in a task folder."""

    file: str = Field(description="model file, relative to the task folder")
    runtime: str = Field("onnx", description="runtime that serves it (cascade.runners)")
    algorithm: str | None = Field(None, description="name in hops and traces (default: file stem)")
    quantize: bool = Field(
        True, description="with --quantize: quantize this tier (false: it serves fp32)")

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        if value not in runtime_names():
            raise ValueError(f"unknown runtime {value!r}; allowed: {', '.join(runtime_names())}")
        return value

    @field_validator("file")
    @classmethod
    def _inside_folder(cls, value: str) -> str:
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError("must be a path inside the task folder")
        return value


class TaskFile(_Strict):
    """The parsed ``task.yaml``."""

    name: str | None = Field(None, description="task name (default: the folder's name)")
    description: str | None = None
    input: InputSpec
    classes: tuple[str, ...] = Field(min_length=2)
    tiers: dict[str, TierModel] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not TASK_NAME.match(value):
            raise ValueError("lowercase letters, digits, '-' and '_', starting with a letter or"
                             " digit")
        return value

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for name in value:
            if name in seen:
                raise ValueError(f"class {name!r} is listed twice")
            seen.add(name)
        return value

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, tiers: dict[str, TierModel]) -> dict[str, TierModel]:
        check_tier_names(tiers)
        # bottom tier first, whatever order the file lists them in
        return {name: tiers[name] for name in TIERS if name in tiers}


@dataclass(frozen=True)
class LoadedTaskFile:
    """A validated task folder: its declaration, its name and where its files are."""

    spec: TaskFile
    folder: Path
    path: Path

    @property
    def name(self) -> str:
        """The task's name: ``name:`` in task.yaml, else the folder's name."""
        return self.spec.name or self.folder.name

    def model_path(self, tier: str) -> Path:
        """The model file of ``tier`` (exists: checked when loaded)."""
        return self.folder / self.spec.tiers[tier].file


def load_task_file(folder: Path) -> LoadedTaskFile:
    """Read and validate ``<folder>/task.yaml`` and check every model file it names exists.

    Raises :class:`RegistrationError` naming the file and the key path.
    """
    folder = Path(folder)
    path = folder / TASK_FILE
    source = str(path)
    if not folder.is_dir():
        raise RegistrationError(f"{folder}: not a directory; register a task folder holding "
                                f"{TASK_FILE} and its models", file=str(folder))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RegistrationError(f"{source}: missing; a task folder needs a {TASK_FILE} that "
                                "declares the input, the classes and each tier's model",
                                file=source) from None
    except OSError as exc:
        raise RegistrationError(f"{source}: cannot read: {exc.strerror}", file=source) from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RegistrationError(f"{source}: {yaml_problem(exc)}", file=source) from None
    if not isinstance(data, dict):
        raise RegistrationError(f"{source}: (root): must be a mapping with input, classes and "
                                f"tiers; got {type(data).__name__}", file=source, key="(root)")
    try:
        spec = TaskFile.model_validate(data)
    except ValidationError as exc:
        lines = validation_lines(exc, source=source, root=TaskFile)
        raise RegistrationError("\n".join(line for _, line in lines), file=source,
                                key=lines[0][0]) from None
    loaded = LoadedTaskFile(spec=spec, folder=folder.resolve(), path=path.resolve())
    for tier, model in spec.tiers.items():
        if not loaded.model_path(tier).is_file():
            raise RegistrationError(
                f"{source}: tiers.{tier}.file: model file {model.file!r} not found in {folder}",
                file=source, key=f"tiers.{tier}.file")
    return loaded
