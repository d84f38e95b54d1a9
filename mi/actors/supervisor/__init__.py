"""The `mi-backend` process: its HTTP API, the replicas (scheduler + workers), detokenizing."""
