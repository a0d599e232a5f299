# ruff: noqa: E402 (bitsandbytes' log filter is installed before peft, which imports bitsandbytes, is imported)
"""peft-mazo: masked zeroth-order (MaZO) multi-task fine-tuning as a PEFT method.

`import peft_mazo` registers the "MAZO" method with peft, so that `get_peft_model`, `PeftModel.from_pretrained` and
`PeftConfig.from_pretrained` handle `MaZOConfig` adapters.
"""

from ._quiet import install_bitsandbytes_filter


install_bitsandbytes_filter()  # before peft imports bitsandbytes: see peft_mazo/_quiet.py

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ._peft_type import ensure_mazo_peft_type
from .config import MaZOConfig
from .importance import ImportanceReport, compute_importance
from .layer import Linear, MaZOLayer
from .model import MaZOModel
from .trainer import MaZOTrainer, MaZOTrainingArguments
from .zo import (
    ZOSGD,
    CoBaWeighting,
    EqualWeighting,
    FAMOWeighting,
    StaticWeighting,
    TaskWeighting,
    ZOStepResult,
    make_weighting,
)


__version__ = "0.1.0"

# Registration is idempotent: a second import (e.g. after importlib.reload) finds the method already there.
if PEFT_TYPE_TO_TUNER_MAPPING.get(ensure_mazo_peft_type()) is None:
    register_peft_method(name="mazo", config_cls=MaZOConfig, model_cls=MaZOModel, prefix="mazo_")

__all__ = [
    "CoBaWeighting",
    "EqualWeighting",
    "FAMOWeighting",
    "ImportanceReport",
    "Linear",
    "MaZOConfig",
    "MaZOLayer",
    "MaZOModel",
    "MaZOTrainer",
    "MaZOTrainingArguments",
    "StaticWeighting",
    "TaskWeighting",
    "ZOSGD",
    "ZOStepResult",
    "__version__",
    "compute_importance",
    "make_weighting",
]
