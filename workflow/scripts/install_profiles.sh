#!/usr/bin/env bash
# Make `snakemake --profile slurm` work from the repo root: Snakemake looks a profile name up in
# the user's config dir, so link ~/.config/snakemake/slurm to this repo's profiles/slurm (an
# existing profile of that name that is not ours is left alone, with a note).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
dest="${XDG_CONFIG_HOME:-$HOME/.config}/snakemake"
mkdir -p "$dest"
for name in slurm; do
  target="$repo/profiles/$name"
  [ -d "$target" ] || continue
  if [ -L "$dest/$name" ] || [ ! -e "$dest/$name" ]; then
    ln -sfn "$target" "$dest/$name"
  else
    echo "note: $dest/$name exists and is not a link; use --profile $target" >&2
  fi
done
