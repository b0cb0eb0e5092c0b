"""The SMTP protocol core: sans-I/O, no sockets, no clocks."""
