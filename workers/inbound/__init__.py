"""The inbound worker: SMTP server sessions -> policy -> durable queue commit -> 250."""
