"""The Dash redundancy explorer (``ditlens dash TRACE [--plan P] [--report R]``).

``create_app(trace_path, plan=None, report=None) -> dash.Dash`` builds the app. Importing this
package does not import dash or plotly (the CLI registers its verb without them); they are
imported when the app is built (``pip install 'ditlens[dash]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ditlens.dashboards.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from ditlens.dashboards.app import create_app

        return create_app
    raise AttributeError(f"module 'ditlens.dashboards' has no attribute {name!r}")


__all__ = ["create_app"]
