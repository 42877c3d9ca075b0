"""Summarise training runs into a Table-4-style report; see mtrl_ntk/report.py.

    python scripts/summarize.py RUNS_DIR [--out DIR] [--watch [--interval S]]
"""

from mtrl_ntk.report import main

if __name__ == "__main__":
    raise SystemExit(main())
