"""Pure decision logic: no I/O, no clock, no logging.

State and ``now`` go in, decisions come out.
"""
