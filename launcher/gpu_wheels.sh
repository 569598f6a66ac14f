# Sourced by the GPU scripts (launcher/gpu_smoke.sh, launcher/gpu_bench.sh): a machine without the
# project's packages (no network) takes them as wheels carried in .whl/ (see
# ../shared/notes/gpu-device.md for the list), installed into a scratch folder put on PYTHONPATH.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlpdist-site .whl/*.whl \
        && export PYTHONPATH="/tmp/vlpdist-site${PYTHONPATH:+:$PYTHONPATH}"
fi
