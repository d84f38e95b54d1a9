"""MLInference (`mi`): converter, continuous-batching backend, OpenAI frontend and SDK.

`from mi import Model` loads the SDK on first use, so `import mi` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_SDK_NAMES = frozenset(
    {
        "Model",
        "AsyncModel",
        "Stream",
        "AsyncStream",
        "GenerationOutput",
        "StreamOutput",
        "TokenLogprob",
        "MIError",
        "BackendUnavailable",
        "Overloaded",
        "InvalidRequest",
        "AuthenticationError",
        "ServerError",
        "RequestTimeout",
    }
)

__all__ = ["__version__", *sorted(_SDK_NAMES)]


def __getattr__(name: str):
    if name in _SDK_NAMES:
        from mi import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'mi' has no attribute {name!r}")
