"""One subpackage per process kind: inbound (more come: scheduler, delivery, control)."""
