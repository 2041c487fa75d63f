"""``python -m aptmoe.run``: the executor's entry point, as torchrun calls it.

    torchrun --nproc_per_node 4 -m aptmoe.run --is_moe=True --model_config=S --pipeline=APTMoE

A thin shim so that the seed's launch line works with our module name; the executor lives
in `aptmoe.exec` (torch is imported only when this runs, never by importing the core).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from aptmoe.exec.cli import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
