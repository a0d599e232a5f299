"""One targeted logging filter: bitsandbytes' note that the optional `kernels` package is not installed.

On a CPU with AVX512-BF16, importing bitsandbytes (which `import peft` does) logs a warning from the logger
`bitsandbytes.backends.cpu.ops` when its optional CPU kernel cannot be loaded from the `kernels` package, then
falls back to its own CPU implementation. When the reason is only that `kernels` is not installed, that line is noise
printed on every `import peft_mazo`; this filter turns that one case into a DEBUG record of `peft_mazo` (visible
with `logging.getLogger("peft_mazo").setLevel(logging.DEBUG)`). Any other failure to load the kernel (the package is
installed but broken, or the hub cannot be reached) and every other message of that logger pass unchanged.

The filter must be installed before bitsandbytes is imported: `peft_mazo/__init__.py` installs it before importing
peft. A program that imports peft (or bitsandbytes) before `peft_mazo` still sees the line.
"""

from __future__ import annotations

import logging


BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
MISSING_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"

logger = logging.getLogger("peft_mazo")


class MissingKernelsFilter(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning when its cause is that the optional
    `kernels` package is not installed (re-logged at DEBUG by `peft_mazo`); keeps every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(MISSING_KERNELS_MESSAGE)):
            return True
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(cause, ModuleNotFoundError) and cause.name == "kernels":
            logger.debug("bitsandbytes: %s", record.getMessage())
            return False
        return True


def install_bitsandbytes_filter() -> None:
    """Attach `MissingKernelsFilter` to bitsandbytes' CPU logger once (idempotent)."""
    target = logging.getLogger(BNB_CPU_OPS_LOGGER)
    if not any(isinstance(existing, MissingKernelsFilter) for existing in target.filters):
        target.addFilter(MissingKernelsFilter())
