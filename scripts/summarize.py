"""Summarise training runs into a Table-4-style report; see mtrl_ntk/report/.

    python scripts/summarize.py RUNS_DIR [--out DIR] [--final last|mean-last-k|best]
                                [--last-k K] [--watch [--interval S]]
"""

from mtrl_ntk.report import main

if __name__ == "__main__":
    raise SystemExit(main())
