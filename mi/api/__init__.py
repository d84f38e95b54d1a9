"""Protocol data shared by the backend, the frontend and the SDK: schemas, checks, SSE.

Plain data only: no tensors, no aiohttp, no actors.
"""
