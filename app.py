"""The gateway's front door: gunicorn serves `app:app`, and `python app.py` runs it on werkzeug.

The code is in the `gateway` package; `gateway/app.py` holds `create_app()`. Importing this
module builds nothing: `app` is made on first use.
"""

from __future__ import annotations

from typing import Any

import gateway.app
from gateway.app import create_app, main

__all__ = ["create_app", "main"]  # and `app`, made on first use


def __getattr__(name: str) -> Any:
    """`app`, built once by `gateway.app` on first use."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return gateway.app.app


if __name__ == "__main__":
    main()
