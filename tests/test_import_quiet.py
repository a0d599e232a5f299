"""`import peft_mazo` does not print bitsandbytes' "kernels is not installed" note (filtered by peft_mazo/_quiet.py),
and only that note."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from peft_mazo._quiet import BNB_CPU_OPS_LOGGER, MISSING_KERNELS_MESSAGE, MissingKernelsFilter
from tests.helpers import ROOT


NOTE = MISSING_KERNELS_MESSAGE + ": %s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1"


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(BNB_CPU_OPS_LOGGER, logging.WARNING, "ops.py", 253, msg, args, None)


def _missing(name: str) -> ModuleNotFoundError:
    error = ModuleNotFoundError(f"No module named '{name}'")
    error.name = name
    return error


def test_filter_drops_only_the_missing_kernels_note(caplog):
    keep = MissingKernelsFilter()
    with caplog.at_level(logging.DEBUG, logger="peft_mazo"):
        assert not keep.filter(_record(NOTE, _missing("kernels")))  # the optional package is absent: noise
    assert "gemm_4bit_forward" in caplog.text  # still there at DEBUG
    assert keep.filter(_record(NOTE, RuntimeError("cannot reach the hub")))  # kernels installed but failing: shown
    assert keep.filter(_record(NOTE, _missing("torch")))  # another missing module: shown
    assert keep.filter(_record("Something else went wrong: %s", _missing("kernels")))  # another message: shown


@pytest.mark.slow
def test_importing_peft_mazo_does_not_print_the_kernels_note():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONWARNINGS", "TQDM_"))}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import peft_mazo, logging; print(logging.getLogger('" + BNB_CPU_OPS_LOGGER + "').filters)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert MISSING_KERNELS_MESSAGE not in result.stderr, result.stderr
    # Other lines are a bitsandbytes release's own (0.47 says its 8-bit optimizer needs CUDA); none comes from us.
    assert "peft_mazo" not in result.stderr, result.stderr
    assert "MissingKernelsFilter" in result.stdout
