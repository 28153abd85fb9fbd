#!/usr/bin/env bash
# The commands of docs/real-data.md, verbatim, on a synthetic cohort; each step under
# /usr/bin/time -v (wall time and peak resident memory) and du for disk.
#
#   benchmarks/runbook_cohort.sh PATIENTS SIZE_PX [WORK_DIR]
#
# e.g. `benchmarks/runbook_cohort.sh 200 1536` (the 200-slide acceptance run, small slides) or
# `benchmarks/runbook_cohort.sh 12 4096` (fewer, larger slides for per-patch rates).
# Results: WORK_DIR/times.tsv (step, seconds, peak RSS MB) and WORK_DIR/disk.tsv.
set -euo pipefail
PATIENTS=${1:?patients}
SIZE=${2:?slide side in 20x pixels}
WORK=${3:-benchmarks/out/runbook-$PATIENTS-$SIZE}
LOWMAG=${LOWMAG:-.venv/bin/lowmag}
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$WORK"
: > "$WORK/times.tsv"

step() {  # step NAME COMMAND...: run under /usr/bin/time -v, record wall seconds and peak RSS
  local name=$1; shift
  /usr/bin/time -v -o "$WORK/$name.time" "$@" > "$WORK/$name.log" 2>&1
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$WORK/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$WORK/$name.time")
  printf '%s\t%s\t%s\n' "$name" "$wall" "$rss" | tee -a "$WORK/times.tsv"
}

SLIDES=$WORK/slides
[ -f "$SLIDES/labels.csv" ] || step synth "$LOWMAG" synth cohort "$SLIDES" --patients "$PATIENTS" --width "$SIZE" --height "$SIZE" --seed 13

# 1. MAGA: align ResNet50-trunc to 5x on the cohort's own slides (no labels).
step maga "$LOWMAG" train-maga --slides "$SLIDES" --mag 5 --pairs-per-slide 8 --epochs 1 --batch-size 16 --max-steps 8 --workers 2 --threads 2 -o "$WORK/maga"
# 2. Features of every slide at 5x with the aligned student (resumable: re-run to continue).
step extract "$LOWMAG" extract-cohort --slides "$SLIDES" --mag 5 --weights "$WORK/maga/student.safetensors" --threads 2 -o "$WORK/features"
# 3. Patient-level 10-fold cross-validation of GLTrans.
step crossval "$LOWMAG" crossval --features "$WORK/features" --labels "$SLIDES/labels.csv" --model gltrans --folds 10 --epochs 5 --patience 3 --threads 2 -o "$WORK/crossval"
# 4. The bundle the portal serves.
step bundle "$LOWMAG" bundle build --features "$WORK/features" --labels "$SLIDES/labels.csv" --mag 5 --encoder-weights "$WORK/maga/student.safetensors" --maga-config "$WORK/maga/maga.json" --epochs 5 --name synthetic-gltrans -o "$WORK/bundle"

{
  printf 'slides\t%s\n' "$(du -sb "$SLIDES" | cut -f1)"
  printf 'maga\t%s\n' "$(du -sb "$WORK/maga" | cut -f1)"
  printf 'features\t%s\n' "$(du -sb "$WORK/features" | cut -f1)"
  printf 'bundle\t%s\n' "$(du -sb "$WORK/bundle" | cut -f1)"
  printf 'patches\t%s\n' "$(.venv/bin/python -c "import h5py,glob,sys; print(sum(h5py.File(p)['features'].shape[0] for p in glob.glob(sys.argv[1] + '/*.h5')))" "$WORK/features")"
} | tee "$WORK/disk.tsv"
