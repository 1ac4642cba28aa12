"""The seed's front door to the fleet: `from backend_manager import backend_manager`.

The code is in `gateway/manager.py`: `BackendManager`, the one owner of the fleet's state, and
`backend_manager`, its default instance, which `create_app()` configures.
"""

from gateway.manager import BackendManager, Lease, NoServer, PersistError, Pick, RouteRequest, backend_manager

__all__ = ["BackendManager", "Lease", "NoServer", "PersistError", "Pick", "RouteRequest", "backend_manager"]
