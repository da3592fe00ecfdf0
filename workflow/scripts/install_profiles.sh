#!/usr/bin/env bash
# Make `snakemake --profile slurm` (and `--profile local`) work from the repository root.
#
# Snakemake 9 resolves `--profile NAME` (snakemake/cli.py, get_profile_dir): if NAME exists as a
# path relative to the working directory it is used as is (so `--profile profiles/slurm` always
# works from the repo root); otherwise it looks for a folder NAME in, in order, the working
# directory, the user config dir ($XDG_CONFIG_HOME/snakemake, default ~/.config/snakemake) and the
# site config dir (/etc/xdg/snakemake). `profiles/` is not searched, so this script links
#   ~/.config/snakemake/slurm -> <repo>/profiles/slurm
#   ~/.config/snakemake/local -> <repo>/profiles/local
# A link to the repo (not a copy) keeps edits to profiles/slurm/config.yaml effective.
# An existing profile of the same name that is not a link is left alone (with a note, exit 0).
# Usage: workflow/scripts/install_profiles.sh [--uninstall]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
dest=${XDG_CONFIG_HOME:-$HOME/.config}/snakemake

for name in slurm local; do
    src=$repo/profiles/$name
    link=$dest/$name
    if [[ ${1:-} == --uninstall ]]; then
        if [[ -L $link && $(readlink "$link") == "$src" ]]; then
            rm "$link" && echo "removed $link"
        fi
        continue
    fi
    [[ -f $src/config.yaml ]] || { echo "install_profiles: missing $src/config.yaml" >&2; exit 1; }
    mkdir -p "$dest"
    if [[ -L $link ]]; then
        ln -sfn "$src" "$link" # re-point an old link (e.g. another checkout)
    elif [[ -e $link ]]; then
        echo "install_profiles: $link exists and is not a link; left alone." \
            "Use --profile profiles/$name from the repo root instead." >&2
        continue
    else
        ln -s "$src" "$link"
    fi
    echo "$link -> $src"
done
