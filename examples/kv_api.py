"""The README example's interface: what the service offers, shared by both sides."""

import capbus


class KV(capbus.Interface):
    errors = (KeyError,)  # raised by the service, raised again as KeyError at the caller

    def get(self, key: str) -> bytes: ...
    def put(self, key: str, value: bytes) -> None: ...
    def keys(self) -> list[str]: ...
