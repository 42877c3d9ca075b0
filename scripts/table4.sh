#!/usr/bin/env bash
# Table 4 of Qin et al. (NeurIPS 2025) on MT10, as its authors ran each row: 12 rows x 10 seeds.
#
#   bash scripts/table4.sh                                   # every row, seeds 0..9, one after another
#   bash scripts/table4.sh hydra/launcher=slurm              # extra Hydra overrides go to every row
#   ROWS="ntkmtl_sr uw" SEEDS=0..2 bash scripts/table4.sh    # other rows (configs/experiment/table4/)
#
# One Hydra multirun per row (configs/experiment/table4/<row>.yaml):
#   python run_mt10.py -m experiment=table4/<row> seed=0..9
# Runs land in ${MTRL_NTK_RUNS_DIR:-runs}/table4-<row>/<combiner>/seed<k>; summarise them with
#   python scripts/summarize.py runs/ --final last
# The 12 rows are the 12 rows of the paper's Table 4 (mtrl_ntk.report.PUBLISHED_TABLE_4).
set -euo pipefail
cd "$(dirname "$0")/.."
TABLE4_ROWS="stl mtsac mtsac_te mhsac pcgrad cagrad moco nashmtl famo fairgrad aligned_mtl ntkmtl"
ROWS=${ROWS:-$TABLE4_ROWS}
SEEDS=${SEEDS:-0..9}
PYTHON=${PYTHON:-python}
for row in $ROWS; do
    "$PYTHON" run_mt10.py -m "experiment=table4/$row" "seed=$SEEDS" "$@"
done
