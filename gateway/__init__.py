"""GPU Gateway: one stable address in front of a changing fleet of GPU servers.

The wings, from the ones users call down to the fleet (imports run this way only):
api/ → proxy/ → manager.py → routing/ → fleet/, with observability/ beside them.
"""

__version__ = "0.1.0"
