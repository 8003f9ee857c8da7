"""The optional ``llama_context_params`` a :class:`~nexabind.lowlevel.Context` passes through."""

from __future__ import annotations

from typing import Any

from nexabind.lowlevel._lib import AttentionType, GgmlType, RopeScalingType, enum_value

_UINT32_MAX = 0xFFFFFFFF


_ENUM_PARAMS: dict[str, type[Any]] = {
    "rope_scaling_type": RopeScalingType,
    "attention_type": AttentionType,
    "type_k": GgmlType,
    "type_v": GgmlType,
}
_FLOAT_PARAMS = (
    "rope_freq_base",
    "rope_freq_scale",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
)
_BOOL_PARAMS = ("offload_kqv", "op_offload", "swa_full", "no_perf")


def set_params(p: Any, params: dict[str, Any]) -> None:
    """Write the optional context parameters into ``p`` (None leaves llama.cpp's default).

    Raises:
        TypeError: An unknown parameter.
        ValueError: A value out of its range (llama.cpp reads enums as table indices).
    """
    known = {*_ENUM_PARAMS, *_FLOAT_PARAMS, *_BOOL_PARAMS, "yarn_orig_ctx"}
    unknown = sorted(set(params) - known)
    if unknown:
        msg = f"unknown context parameters {unknown}; known: {sorted(known)}"
        raise TypeError(msg)
    for name, value in params.items():
        if value is None:
            continue
        if name in _ENUM_PARAMS:
            setattr(p, name, enum_value(_ENUM_PARAMS[name], name, value))
        elif name in _FLOAT_PARAMS:
            setattr(p, name, float(value))
        elif name == "yarn_orig_ctx":
            if not 0 <= value <= _UINT32_MAX:
                msg = f"yarn_orig_ctx={value!r} is invalid; use 0 (the model's) or a length"
                raise ValueError(msg)
            p.yarn_orig_ctx = value
        else:
            setattr(p, name, bool(value))
