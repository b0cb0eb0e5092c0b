"""The control process: /metrics, /healthz, /readyz and the JSON admin API (queue operations)."""
