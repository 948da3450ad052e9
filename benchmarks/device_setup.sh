# Sourced at the start of every device command: gguf from the carried wheel, the repo on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GGFLAT_CACHE_DIR=/tmp/ggflat-cache
mkdir -p /tmp/ggflat-cache/models
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
