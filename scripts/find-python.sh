#!/usr/bin/env bash
# Prints the first Python 3.12+ that really runs (pyenv shims can exist without working).
for cand in "${PYTHON:-}" python3.12 python3.13 python3 $HOME/.pyenv/versions/3.12*/bin/python3 $HOME/.pyenv/versions/3.13*/bin/python3 /usr/bin/python3.12 /usr/bin/python3.13; do
  [ -n "$cand" ] || continue
  if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
    command -v "$cand" || echo "$cand"
    exit 0
  fi
done
echo "Lifeboat needs Python 3.12 or newer (Django 6); none was found." >&2
exit 1
