"""capbus's gateway: services across hosts over Eclipse Zenoh, with capabilities kept (tokens
signed by the exporting gateway). Needs the `gateway` extra: `pip install capbus[gateway]`."""

from __future__ import annotations

try:
    import cryptography  # noqa: F401
    import zenoh  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra's absence
    raise ImportError(
        f"capbus.Gateway needs the gateway extra ({exc.name} is missing): "
        "pip install 'capbus[gateway]'") from exc

from .gateway import Gateway

__all__ = ["Gateway"]
