"""Allocations: long-lived keys (a conversation, a LoRA adapter, a user's model) pinned to servers with room.

records.py holds the shapes; strategies.py the pure choices (seed 003's score, the four
strategies, the rebalance's next move); store.py and redis_store.py keep them; service.py
places, moves and routes them; announce.py signs each move to ALLOCATION_MIGRATE_URL;
failover.py moves the keys of a server that left or stayed down.
"""
