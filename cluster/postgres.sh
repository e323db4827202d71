#!/usr/bin/env bash
# The head's PostgreSQL: MLflow's tracking store and Optuna's study store, kept outside the Ray container and
# backed up to the bucket, so that `ray down`, a reboot or a new container loses no result.
#
#   bash cluster/postgres.sh start     initialise (or restore the latest backup into) $SER_DB_HOME/data, start
#                                      the server, create the databases; with SER_DB_BACKUP, back up every
#                                      SER_DB_BACKUP_EVERY seconds in the background
#   bash cluster/postgres.sh backup    dump both databases to SER_DB_BACKUP now (before `ray down`, README)
#   bash cluster/postgres.sh stop      stop the server and the backups
#
# Environment:
#   SER_DB_HOME          data, sockets, log, URIs and the password file (default ~/ser-db). On the cluster a
#                        folder of the host, mounted into the container (cluster/*.yaml, docker.head_run_options):
#                        it outlives the container; the bucket backup outlives the machine.
#   SER_DB_PORT          TCP port on 127.0.0.1 (default 5432). The server listens on the loopback only: MLflow and
#                        the sweep driver run on the head; nothing else needs it.
#   SER_DB_BACKUP        s3://BUCKET/prefix, gs://BUCKET/prefix or a folder; unset = no backups, no restore.
#   SER_DB_BACKUP_EVERY  seconds between background backups (default 900).
#   SER_DB_OS_USER       who runs the server when this script runs as root (PostgreSQL refuses root): postgres.
#
# Written for other processes: $SER_DB_HOME/mlflow_uri (`mlflow server --backend-store-uri`),
# $SER_DB_HOME/optuna_uri (an SQLAlchemy URL for Optuna's RDBStorage) and $SER_DB_HOME/pgpass (the generated
# password, libpq's PGPASSFILE format, mode 600): the URIs carry no password, so it never shows in a process
# list or an MLflow param. Two databases, mlflow and optuna, in one server: both keep an alembic_version table.
set -euo pipefail

home="${SER_DB_HOME:-$HOME/ser-db}"
port="${SER_DB_PORT:-5432}"
backup="${SER_DB_BACKUP:-}"
every="${SER_DB_BACKUP_EVERY:-900}"
data="$home/data"
export PGPASSFILE="$home/pgpass"
DATABASES=(mlflow optuna)

# Debian/Ubuntu put the server binaries in /usr/lib/postgresql/<major>/bin, off PATH.
if ! command -v pg_ctl > /dev/null; then
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$bin" ] || { echo "postgres.sh: no PostgreSQL server (pg_ctl) here; install the postgresql package" >&2; exit 1; }
  PATH="$bin:$PATH"
fi

as_server() {  # run a server binary as the server's OS user
  if [ "$(id -u)" = 0 ]; then runuser -u "${SER_DB_OS_USER:-postgres}" -- "$@"; else "$@"; fi
}

psql_ser() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U ser "$@"; }

copy() {  # copy one file between a local path and object storage, through pyarrow's filesystems (as Ray does)
  python - "$1" "$2" <<'EOF'
import sys
import pyarrow.fs as pafs
from ser_platform.cluster import resolve_storage
(src_fs, src), (dst_fs, dst) = resolve_storage(sys.argv[1]), resolve_storage(sys.argv[2])
dst_fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
EOF
}

exists() {
  python - "$1" <<'EOF'
import sys
import pyarrow.fs as pafs
from ser_platform.cluster import resolve_storage
filesystem, path = resolve_storage(sys.argv[1])
sys.exit(0 if filesystem.get_file_info(path).type == pafs.FileType.File else 1)
EOF
}

stop_backups() {
  if [ -f "$home/backup.pid" ]; then
    old=$(cat "$home/backup.pid")
    if grep -qa "postgres.sh" "/proc/$old/cmdline" 2>/dev/null; then kill -- "-$old" 2>/dev/null || true; fi
    rm -f "$home/backup.pid"
  fi
}

do_backup() {
  [ -n "$backup" ] || { echo "postgres.sh backup: set SER_DB_BACKUP (s3://BUCKET/prefix, gs://... or a folder)" >&2; exit 1; }
  local stamp work
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  work=$(mktemp -d)
  for db in "${DATABASES[@]}"; do
    pg_dump -h 127.0.0.1 -p "$port" -U ser --format=custom --file "$work/$db.dump" "$db"
  done
  # A complete history first, then latest/ (each object is replaced whole: a reader never sees half a dump).
  for db in "${DATABASES[@]}"; do copy "$work/$db.dump" "${backup%/}/$stamp/$db.dump"; done
  for db in "${DATABASES[@]}"; do copy "$work/$db.dump" "${backup%/}/latest/$db.dump"; done
  rm -rf "$work"
  echo "postgres.sh: backed up ${DATABASES[*]} to ${backup%/}/$stamp/ and ${backup%/}/latest/"
}

initialise() {
  local password pwfile
  mkdir -p "$data"
  chmod 700 "$data"
  password=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
  pwfile=$(mktemp -p "$home")
  printf '%s\n' "$password" > "$pwfile"
  if [ "$(id -u)" = 0 ]; then chown "${SER_DB_OS_USER:-postgres}" "$data" "$home/run" "$pwfile"; fi
  as_server initdb --pgdata "$data" --username ser --pwfile "$pwfile" --auth scram-sha-256 --encoding UTF8 \
    > "$home/initdb.log"
  rm -f "$pwfile"
  umask 077
  printf '127.0.0.1:%s:*:ser:%s\n' "$port" "$password" > "$PGPASSFILE.tmp"
  mv "$PGPASSFILE.tmp" "$PGPASSFILE"
}

start() {
  # Docker creates a missing host folder of a -v mount as root; the container's user needs it.
  if [ -d "$home" ] && [ ! -w "$home" ]; then sudo chown "$(id -u):$(id -g)" "$home"; fi
  mkdir -p "$home/run"
  fresh=false
  if [ ! -s "$data/PG_VERSION" ]; then
    rm -rf "$data"
    initialise
    fresh=true
  fi
  [ -s "$PGPASSFILE" ] || { echo "postgres.sh: $data exists but $PGPASSFILE is missing" >&2; exit 1; }
  # The port may differ from the last start: the password file names it.
  sed -i "s/^127\.0\.0\.1:[0-9]*:/127.0.0.1:$port:/" "$PGPASSFILE"
  if ! as_server pg_ctl --pgdata "$data" status > /dev/null 2>&1; then
    as_server pg_ctl --pgdata "$data" --log "$home/run/postgresql.log" --wait --timeout 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $home/run" start > /dev/null
  fi
  for db in "${DATABASES[@]}"; do
    if [ -z "$(psql_ser -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
      psql_ser -d postgres -c "CREATE DATABASE $db"
    fi
  done
  # A new data folder on a machine whose bucket holds a backup: the head was lost; bring its results back.
  if $fresh && [ -n "$backup" ] && exists "${backup%/}/latest/mlflow.dump"; then
    for db in "${DATABASES[@]}"; do
      copy "${backup%/}/latest/$db.dump" "$home/restore-$db.dump"
      pg_restore -h 127.0.0.1 -p "$port" -U ser --dbname "$db" --no-owner --exit-on-error "$home/restore-$db.dump"
      rm -f "$home/restore-$db.dump"
    done
    echo "postgres.sh: restored ${DATABASES[*]} from ${backup%/}/latest/"
  fi
  echo "postgresql://ser@127.0.0.1:$port/mlflow" > "$home/mlflow_uri"
  echo "postgresql+psycopg://ser@127.0.0.1:$port/optuna" > "$home/optuna_uri"
  stop_backups
  if [ -n "$backup" ]; then
    setsid nohup bash "$0" backup-loop >> "$home/backup.log" 2>&1 < /dev/null &
    echo $! > "$home/backup.pid"
  fi
  echo "PostgreSQL on 127.0.0.1:$port (data: $data; MLflow: $home/mlflow_uri, Optuna: $home/optuna_uri)"
}

case "${1:-}" in
  start) start ;;
  backup) do_backup ;;
  backup-loop) while sleep "$every"; do bash "$0" backup || echo "postgres.sh: backup failed; next try in $every s"; done ;;
  stop)
    stop_backups
    if [ -s "$data/PG_VERSION" ]; then as_server pg_ctl --pgdata "$data" --mode fast --wait stop > /dev/null || true; fi ;;
  *) echo "usage: postgres.sh start|backup|stop (environment: see the top of this file)" >&2; exit 2 ;;
esac
