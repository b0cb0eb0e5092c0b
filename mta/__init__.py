"""mta: a durable, multi-process SMTP relay."""

__version__ = "0.1.0"
