"""The Python SDK (`from mi import Model`) and the one HTTP transport to a backend.

`Model` / `AsyncModel` (model.py, async_model.py), streams (stream.py), typed errors and
outputs (types.py); transport.py is the backend client that the frontend uses too.
"""

from mi.sdk.model import *  # noqa: F403 - the SDK's public names are model.py's __all__
from mi.sdk.model import __all__  # noqa: F401
