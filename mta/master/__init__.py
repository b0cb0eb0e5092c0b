"""The prefork master: listeners, worker processes, connection handoff, supervision."""
