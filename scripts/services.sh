#!/usr/bin/env bash
# Start or stop the real services the service-marked tests use (PostgreSQL, and Slurm where
# scripts/services/slurm.sh exists), then write .services/env for `source .services/env`:
#   export PHP_RUN_TEST_PG_URL=postgresql+psycopg://...   (and SLURM_CONF=... from slurm.sh)
# Each part installs its Debian packages when missing and reuses a service already running, and
# leaves its exports either in .services/<part>.env or as `export ...` lines on its stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

verb=${1:-}
[[ $verb == start || $verb == stop ]] || { echo "usage: $0 start|stop" >&2; exit 2; }

parts=(scripts/services/postgres.sh)
[[ -f scripts/services/slurm.sh ]] && parts+=(scripts/services/slurm.sh)

mkdir -p .services
if [[ $verb == start ]]; then
    for part in "${parts[@]}"; do
        name=$(basename "$part" .sh)
        output=$(bash "$part" start)
        if grep -q '^export ' <<<"$output"; then grep '^export ' <<<"$output" > ".services/$name.env"; fi
    done
else
    # Stop in reverse order: Slurm's accounting may use a database started before it.
    for (( i=${#parts[@]}-1; i>=0; i-- )); do
        bash "${parts[i]}" stop || true
        rm -f ".services/$(basename "${parts[i]}" .sh).env"
    done
fi
# Each part leaves its exports in .services/<part>.env; the env file is their union.
cat .services/*.env 2>/dev/null > .services/env.tmp || true
mv .services/env.tmp .services/env
