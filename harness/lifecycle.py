"""Context-manager lifecycle shared by everything the harness starts and must stop."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound="StartStop")


class StartStop:
    """Call ``start`` on enter and ``stop`` on exit, and ``stop`` as well when ``start`` fails.

    ``stop`` must therefore be safe after a partial start and safe to call twice.
    """

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
