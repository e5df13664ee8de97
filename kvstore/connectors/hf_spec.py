"""Does a namespace describe a model's KV? The checks the HF connector runs before any request.

KV is only ever reused under the namespace it was stored in, so a namespace
whose spec names another model, another geometry or a layout the connector
cannot fill would either never hit or, worse, hand a model KV of a different
shape. :func:`check_namespace` refuses such a namespace up front with a
:class:`NamespaceMismatch` that names every difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.errors import InvalidInput
from kvstore.keys import Namespace, get_scheme
from kvstore.models.kv import spec_from_config
from kvstore.models.smollm2 import LoadedModel
from kvstore.spec import KVSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

#: chunk dtypes the connector converts to and from the model's compute dtype
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


class NamespaceMismatch(InvalidInput):
    """A namespace's KV spec (or hash scheme) does not describe the model the connector runs."""


def model_and_spec(model: LoadedModel | PreTrainedModel) -> tuple[PreTrainedModel, KVSpec | None]:
    """The transformers model, and its KV spec when the caller's object carries one (``LoadedModel``)."""
    if isinstance(model, LoadedModel):
        return model.model, model.spec
    return model, None


def check_namespace(ns: Namespace, model_spec: KVSpec | None, config: PretrainedConfig) -> None:
    """Raise unless ``ns`` can hold this model's KV.

    Checked: the hash scheme hashes token ids; the layout is ``kv_separate``
    and unsharded; the dtype is a float dtype; layers, kv heads and head dim
    equal the model config's; and, when ``model_spec`` is known, the model
    fingerprint (name and weights revision) is the model's.

    Raises:
        NamespaceMismatch: with every difference found.
    """
    spec = ns.spec
    problems: list[str] = []
    if get_scheme(ns.scheme).engine_provided:
        problems.append(f"scheme {ns.scheme!r} takes an engine's block hashes; the connector hashes token ids")
    if spec.layout != "kv_separate":
        problems.append(f"layout {spec.layout!r}; the model keeps separate K and V")
    if spec.shard.tp_size != 1 or spec.shard.pp_size != 1:
        problems.append(f"shard {spec.shard}; the connector runs the whole model in one process")
    if spec.dtype not in FLOAT_DTYPES:
        problems.append(f"dtype {spec.dtype!r}; one of {FLOAT_DTYPES}")
    geometry = spec_from_config(config, spec.model, spec.dtype)
    for field in ("num_layers", "num_kv_heads", "head_dim"):
        want, got = getattr(geometry, field), getattr(spec, field)
        if want != got:
            problems.append(f"{field} {got}, the model has {want}")
    if model_spec is not None and model_spec.model != spec.model:
        problems.append(f"model {spec.model}, the connector runs {model_spec.model}")
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append("the model has sliding-window layers; their KV of a token range is not stable")
    if problems:
        raise NamespaceMismatch(f"namespace of tenant {ns.tenant!r} does not fit the model: " + "; ".join(problems))
