"""One subpackage per worker process kind: inbound, scheduler, delivery, control; link.py: the master channel."""
