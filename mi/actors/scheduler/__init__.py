"""The scheduler process (one per replica): request state, the KV block manager, step plans."""
