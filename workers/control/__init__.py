"""The control process: /metrics, /healthz, /readyz (the admin API comes later)."""
