# Sourced by the device scripts here: installs the carried wheels (.whl/: peft, bitsandbytes) into /tmp/site,
# puts them and this checkout's src on PYTHONPATH, and sets M to "GPU, memory, driver; torch transformers peft"
# for the records' ``measured`` field.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src
M="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); $(python3 -c 'import torch,transformers,peft;print(torch.__version__,transformers.__version__,peft.__version__)')"
