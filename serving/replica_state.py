"""The gateway instance of this replica process, for the HTTP middleware to reach.

Kept in its own importable module on purpose: Serve ships the ingress class and its FastAPI app to
the replica by value, with copies of their module's globals, while an imported module is shared.
"""

from __future__ import annotations

from typing import Any

gateway: Any = None
