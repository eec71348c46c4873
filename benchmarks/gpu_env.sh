# Sourced by the scripts that run on a lent GPU machine (benchmarks/gpu_study.sh): which Python to run, and what it
# lacks installed from the bundle `make gpu-bundle` writes (no network there).
#   gpu_python               sets PY: $PYTHON if set; else this checkout's .venv (a CPU checkout made by `make setup`;
#                            $MODASM_VENV for a worktree without its own); else the first of python3, python that
#                            imports torch (the GPU image's). Fails, saying what to do, when PY cannot import torch
#                            (a CPU checkout's python3 on PATH without it: every step would fail "No module named torch")
#   gpu_install BUNDLE SITE  installs the bundle's wheels of what PY cannot import (DeepSpeed and its requirements)
#                            into SITE, to be put on PYTHONPATH; nothing when DeepSpeed is importable
gpu_python() {
  local root cand
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  local venv_py=${MODASM_VENV:-$root/.venv}/bin/python
  PY=${PYTHON:-}
  if [ -z "$PY" ] && [ -x "$venv_py" ]; then PY=$venv_py; fi
  for cand in python3 python; do
    if [ -z "$PY" ] && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; fi
  done
  if [ -z "$PY" ] || ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "$(basename "$0"): no Python with torch (${PY:-none of $venv_py, python3, python}): run 'make setup' in" \
         "$root, or pass PYTHON=/path/to/python" >&2
    return 1
  fi
  export PY
}

gpu_install() {
  "$PY" - "$1" "$2" <<'PYEOF'
import importlib.metadata as md, pathlib, re, subprocess, sys
bundle, site = sys.argv[1], sys.argv[2]
try:
    md.version("deepspeed"); print("deepspeed is importable: nothing to install"); sys.exit(0)
except md.PackageNotFoundError:
    pass
wheels = sorted(pathlib.Path(bundle, "wheels").glob("*.whl")) if bundle else []
if not wheels:
    sys.exit("DeepSpeed is missing and no wheels were given: make gpu-bundle here, then --bundle build/gpu-bundle")
missing = []
for w in wheels:  # the bundle's distributions this Python lacks (deepspeed's requirements, modasm's)
    name = re.split(r"-\d", w.name, 1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        if name not in missing:  # one wheel per platform of the binary ones
            missing.append(name)
print("installing from the bundle (no network):", " ".join(missing))
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                "--find-links", str(pathlib.Path(bundle, "wheels")), *missing], check=True)
PYEOF
}
