#!/usr/bin/env bash
# Download COCO 2017 detection (train/val images and annotations, about 19 GB) and lay it out as
#   DIR/train2017/  DIR/val2017/  DIR/annotations/instances_{train,val}2017.json
# which is what dataset=coco dataset.root=DIR reads.
#
#   scripts/prepare_coco.sh DIR
#
# Archives go to DIR/downloads and are kept: an interrupted download continues where it stopped,
# and archives copied there by hand (e.g. from a connected machine) are used without a network.
# Delete DIR/downloads afterwards to save space. Needs curl and unzip.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$1
BASE=${COCO_MIRROR:-http://images.cocodataset.org}
ARCHIVES=(annotations/annotations_trainval2017.zip zips/val2017.zip zips/train2017.zip)
for tool in curl unzip; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is required" >&2; exit 1; }
done
mkdir -p "$DIR/downloads"

complete() { [ -s "$1" ] && unzip -tqq "$1" >/dev/null 2>&1; }

missing=()
for path in "${ARCHIVES[@]}"; do
    complete "$DIR/downloads/$(basename "$path")" || missing+=("$path")
done
if [ ${#missing[@]} -gt 0 ] && ! curl --silent --head --fail --max-time 20 "$BASE/${ARCHIVES[0]}" >/dev/null; then
    echo "$0: cannot reach $BASE (no network, or a proxy is needed)." >&2
    echo "Download these on a connected machine into $DIR/downloads/ and run this again:" >&2
    printf '  %s\n' "${missing[@]/#/$BASE/}" >&2
    exit 1
fi
for path in "${missing[@]}"; do
    file=$DIR/downloads/$(basename "$path")
    echo "downloading $BASE/$path"
    curl --fail --location --continue-at - --retry 5 --output "$file" "$BASE/$path"
    complete "$file" || { echo "$0: $file is damaged; delete it and run again" >&2; exit 1; }
done

for path in "${ARCHIVES[@]}"; do
    unzip -q -n "$DIR/downloads/$(basename "$path")" -d "$DIR"
done
for f in annotations/instances_train2017.json annotations/instances_val2017.json; do
    [ -f "$DIR/$f" ] || { echo "$0: $DIR/$f is missing after unpacking" >&2; exit 1; }
done
echo "COCO 2017 is ready in $DIR: $(ls "$DIR/train2017" | wc -l) train and $(ls "$DIR/val2017" | wc -l) val images"
echo "train with: python tools/train.py experiment=r50_deformable_detr dataset.root=$DIR"
