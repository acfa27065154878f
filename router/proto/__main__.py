"""``python -m pdserve.router.proto``: regenerate the checked-in stubs from the ``.proto``."""

from __future__ import annotations

from . import HERE, generate

if __name__ == "__main__":
    for p in generate(HERE):
        print(p)
