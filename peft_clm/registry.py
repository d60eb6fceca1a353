"""Registration of CLM with PEFT.

`PeftType` is a closed `str` Enum and `register_peft_method` only accepts existing members, so the `CLM` member is
added first; saved `adapter_config.json` files ("peft_type": "CLM") then load through PEFT's own loaders.
"""

from __future__ import annotations

from peft.utils import PeftType


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register_clm() -> None:
    """Add `PeftType.CLM` and register `ClmConfig`/`ClmModel` with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = _add_peft_type_member("CLM")
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    from .config import ClmConfig
    from .model import ClmModel

    register_peft_method(name="clm", config_cls=ClmConfig, model_cls=ClmModel, prefix="clm_")
