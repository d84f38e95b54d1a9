"""`mi-frontend`: the OpenAI-compatible HTTP server (the app lives in mi.actors.frontend.app)."""
