"""The worker process (one per device): a model shard, its KV cache, one forward per step plan."""
