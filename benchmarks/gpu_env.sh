# Sourced by the scripts that run on a lent GPU machine (benchmarks/gpu_study.sh): which Python to run, and what it
# lacks installed from the bundle `make gpu-bundle` writes (no network there).
#   gpu_python               sets PY: $PYTHON if set; else this checkout's .venv (a CPU checkout made by `make setup`);
#                            else the first of python3, python that imports torch (the GPU image's)
#   gpu_install BUNDLE SITE  installs the bundle's wheels of what PY cannot import (DeepSpeed and its requirements)
#                            into SITE, to be put on PYTHONPATH; nothing when DeepSpeed is importable
gpu_python() {
  local root cand
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  PY=${PYTHON:-}
  if [ -z "$PY" ] && [ -x "$root/.venv/bin/python" ]; then PY=$root/.venv/bin/python; fi
  for cand in python3 python; do
    if [ -z "$PY" ] && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; fi
  done
  PY=${PY:-python3}
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
