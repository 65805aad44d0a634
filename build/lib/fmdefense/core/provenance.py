"""What every artifact records about how it was made: command line, library versions, machine."""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch


def provenance() -> dict[str, Any]:
    """Versions and command line recorded in every artifact's metrics."""
    import foolbox
    import numpy

    return {
        "command": " ".join(["fmdefense", *sys.argv[1:]]),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "foolbox": foolbox.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
    }
