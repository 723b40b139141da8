#!/bin/bash
# SMT at benchmark scale: 20,480-px synthetic slides, lesions 0.4-1 mm (a few % of the tissue); encoders of
# DeiT-Tiny width and depth 4, each starting from the patch classifier trained on the same slides' tiles.
# usage: [SLIDES=[72,16,48]] [TILE_ARTIFACT=<dir>] scripts/bench_smt_train.sh <epochs> <run dir | sweep dir> [-m]
#            [overrides...]   (overrides come last, so they win over the settings below)
# SLIDES: train, val, test slides (default [24,8,12]); slide i of a split is the same whatever the count
cd "$(dirname "$0")/.."
epochs=$1; dir=$2; shift 2
where="hydra.run.dir=$dir"; multirun=()
if [ "$1" = "-m" ]; then where="hydra.sweep.dir=$dir"; multirun=(-m); shift; fi
exec .venv/bin/python -m patholite.train "${multirun[@]}" model=smt dataset=smt_synthetic \
  dataset.width=20480 dataset.height=20480 dataset.slides_per_split=${SLIDES:-[24,8,12]} \
  dataset.lesion_diameter_um=[400,1000] dataset.lesion_count=2 dataset.batch_size=4 \
  model.kwargs.depth=4 model.smt.image_size=128 model.smt.grid=8 \
  model.smt.encoder_checkpoint=${TILE_ARTIFACT:-outputs/bench-smt/tile/artifacts/fp32} \
  model.smt.start_epochs=[0,3,6] model.smt.ramp_epochs=2 \
  trainer.max_epochs=$epochs logger=csv callbacks.progress_bar=none "$where" "$@"
