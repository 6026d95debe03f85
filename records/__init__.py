"""The distillation queue: teacher answers (and true labels) kept durably for re-distillation.

Its own room because three others use it and none owns it: the gateway writes records, the
re-distillation job leases and acknowledges them, and routing estimates live agreement from them.
It imports none of those rooms, so each can depend on it without depending on each other.
"""
