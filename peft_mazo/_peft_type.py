"""Adds a ``MAZO`` member to peft's closed ``PeftType`` enum.

peft's ``register_peft_method`` only accepts names that already exist in ``PeftType``, and ``adapter_config.json``
stores the method as ``"peft_type": "MAZO"``, which ``PeftConfig.from_pretrained`` looks up in that enum. An
out-of-tree method therefore has to extend the enum before it registers. This module does exactly that and nothing
else; importing it twice (or after another copy of this package did it) is a no-op.
"""

from __future__ import annotations

from peft.utils import PeftType


MAZO_NAME = "MAZO"


def ensure_mazo_peft_type() -> PeftType:
    """Return ``PeftType.MAZO``, adding the member to the enum the first time.

    ``PeftType`` is a ``str`` enum, so the member is built the way ``enum`` itself builds one (``str.__new__`` plus the
    ``_name_``/``_value_`` slots) and entered in the three lookup tables the enum machinery reads: ``_member_map_``
    (name lookup, ``PeftType["MAZO"]``), ``_value2member_map_`` (value lookup, ``PeftType("MAZO")``) and
    ``_member_names_`` (iteration, ``list(PeftType)``), plus the class attribute for ``PeftType.MAZO``.
    """
    existing = PeftType._member_map_.get(MAZO_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, MAZO_NAME)
    member._name_ = MAZO_NAME
    member._value_ = MAZO_NAME
    member.__objclass__ = PeftType
    member.__init__(MAZO_NAME)
    PeftType._member_map_[MAZO_NAME] = member
    PeftType._value2member_map_[MAZO_NAME] = member
    PeftType._member_names_.append(MAZO_NAME)
    # EnumType.__setattr__ refuses to bind member names; bypass it as enum's own class construction does.
    type.__setattr__(PeftType, MAZO_NAME, member)
    return member
