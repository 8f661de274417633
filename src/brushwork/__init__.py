"""brushwork: Stable Diffusion on your own machine.

    from brushwork import Engine, GenerationRequest
    result = Engine().generate(GenerationRequest(prompt="a red circle on the left", seed=1))
    result.images[0].save("out.png")

Importing brushwork imports no torch; the heavy parts load on first use.
"""

from __future__ import annotations

from .request import (
    BrushworkError,
    Cancelled,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    Mode,
    ModelError,
    ProgressInfo,
)
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "BrushworkError", "Cancelled", "Engine", "GenerationRequest", "GenerationResult", "InvalidRequest", "Mode",
    "ModelError", "ProgressInfo", "Settings", "__version__",
]


def __getattr__(name: str):
    if name == "Engine":
        from .engine.core import Engine

        return Engine
    raise AttributeError(f"module 'brushwork' has no attribute {name!r}")
