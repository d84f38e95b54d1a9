"""MLInference (`mi`): converter, continuous-batching backend, OpenAI frontend and SDK.

`from mi import Model` loads the SDK on first use, so `import mi` stays light.
"""

from __future__ import annotations

_SDK_NAMES = frozenset(
    {"Model", "GenerationOutput", "MIError", "BackendUnavailable", "InvalidRequest", "ServerError"}
)

__all__ = sorted(_SDK_NAMES)


def __getattr__(name: str):
    if name in _SDK_NAMES:
        from mi import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'mi' has no attribute {name!r}")
