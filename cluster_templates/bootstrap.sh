#!/bin/sh
# Prepare a target to run the QLoRA runner; run by the launcher over SSH (or locally) before
# every job, from the launcher's folder on the target:
#   QLORA_WORKDIR=~/qlora-launch QLORA_REQUIREMENTS=requirements.txt QLORA_DEVICE=cuda sh bootstrap.sh
# 1. Python: $QLORA_PYTHON when set (an environment you manage), else a venv under
#    $QLORA_WORKDIR/venvs/<hash of requirements.txt>, built once and reused by every later job
#    with the same requirements; a venv is used only once its install finished (.qlora-ready).
# 2. GPU: nvidia-smi must list a GPU unless QLORA_DEVICE=cpu.
# 3. Stack check (stack_check.py): a bitsandbytes 4-bit layer runs on the device and matches its
#    dequantized weights, before any model is downloaded; versions are reported.
# The last line is `QLORA_BOOTSTRAP <json>`. Exit codes: 10 no usable python, 11 pip install
# failed, 12 no GPU, 13 the stack check failed.
# QLORA_VENV_ONLY=1 stops after step 1: a rented instance's on-start builds the venv at boot,
# while the launcher is still connecting and syncing; the launcher's own run then reuses it.
set -u
here=$(cd "$(dirname "$0")" && pwd)
workdir=${QLORA_WORKDIR:?set QLORA_WORKDIR}
requirements=${QLORA_REQUIREMENTS:-$here/requirements.txt}
device=${QLORA_DEVICE:-cuda}

say() { echo "bootstrap: $*"; }
fail() { code=$1; shift; echo "bootstrap: error: $*" >&2; exit "$code"; }

if [ -n "${QLORA_PYTHON:-}" ]; then
    python=$QLORA_PYTHON
    [ -x "$python" ] || command -v "$python" >/dev/null 2>&1 || \
        fail 10 "resources.python is $python, which is not an executable on this machine"
    say "using the environment at $python (resources.python)"
else
    command -v python3 >/dev/null 2>&1 || fail 10 "python3 is not installed on the target; install Python >= 3.10"
    hash=$(sha256sum "$requirements" | cut -c1-16)
    venv=$workdir/venvs/$hash
    python=$venv/bin/python
    mkdir -p "$workdir/venvs"
    (
        # One builder at a time per requirements hash: two launches on one box share the venv.
        command -v flock >/dev/null 2>&1 && flock 9
        if [ -f "$venv/.qlora-ready" ]; then
            say "reusing venv $venv (requirements hash $hash)"
        else
            say "building venv $venv (requirements hash $hash); this takes a few minutes once per machine"
            rm -rf "$venv"
            python3 -m venv "$venv" || fail 10 "python3 -m venv failed; install the venv module (apt install python3-venv)"
            # shellcheck disable=SC2086  # QLORA_PIP_ARGS is a list of pip options
            "$venv/bin/python" -m pip install --quiet ${QLORA_PIP_ARGS:-} -r "$requirements" \
                || fail 11 "pip install -r requirements.txt failed (see above); check the target's network and disk"
            touch "$venv/.qlora-ready"
        fi
    ) 9>"$workdir/venvs/$hash.lock" || exit $?
fi
[ "${QLORA_VENV_ONLY:-}" = 1 ] && exit 0

if [ "$device" != "cpu" ]; then
    command -v nvidia-smi >/dev/null 2>&1 || \
        fail 12 "nvidia-smi not found: this machine has no NVIDIA driver; use a GPU machine, or set train.device: cpu"
    gpus=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1) || \
        fail 12 "nvidia-smi failed: $gpus"
    say "GPUs: $(echo "$gpus" | tr '\n' ';')"
fi

"$python" "$here/stack_check.py" --device "$device" || \
    fail 13 "the training stack check failed (see above): torch + bitsandbytes cannot run a 4-bit layer on $device here"
