#!/bin/bash
# usage: scripts/bench_smt_tiles.sh <epochs> <run dir> [overrides...]   (run it before bench_smt_train.sh)
# The patch classifier for the baselines (and SMT's encoder initialisation): DeiT-Tiny width, depth 4, on
# 128-px tiles at 1 um/px (SMT layer 3's resolution on these slides) cut from the same training slides.
cd "$(dirname "$0")/.."
exec .venv/bin/python -m patholite.train model=deit_tiny +model.kwargs.depth=4 dataset=smt_synthetic \
  dataset.width=20480 dataset.height=20480 dataset.slides_per_split=[24,8,12] \
  dataset.lesion_diameter_um=[400,1000] dataset.lesion_count=2 dataset.image_size=128 \
  dataset.tile.size=128 dataset.tile.mpp=1.0 dataset.max_tiles_per_slide=400 dataset.batch_size=64 \
  trainer.max_epochs=$1 logger=csv callbacks.progress_bar=none bench.isolation=process "hydra.run.dir=$2" "${@:3}"
