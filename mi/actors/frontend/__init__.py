"""The `mi-frontend` process: the OpenAI HTTP API over one backend (aiohttp, SSE)."""
