"""Loaded at interpreter start by the rank processes of one test (this folder first on PYTHONPATH):
records every torch.distributed tensor collective that vlpdist's own code issues, with the
tensor's device and the calling function, into $VLPDIST_COLLECTIVE_LOG/rank<N>.json at exit.

DeepSpeed calls torch.distributed through its comm module, so wrapping the functions on the
torch.distributed module catches every caller; only calls whose nearest project frame is under
vlpdist/ are kept (DeepSpeed's own collectives are its business)."""

import os

if os.environ.get("VLPDIST_COLLECTIVE_LOG"):
    import atexit
    import functools
    import json
    import sys
    from pathlib import Path

    import torch.distributed as dist

    LIBRARY = str(Path(__file__).resolve().parents[2] / "vlpdist") + os.sep
    calls: list[dict] = []

    def _vlpdist_caller():
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.startswith(LIBRARY):
                return f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
            frame = frame.f_back
        return None

    def _wrap(name):
        original = getattr(dist, name)

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            caller = _vlpdist_caller()
            if caller is not None:
                tensor = args[0] if args else next(iter(kwargs.values()))
                calls.append({"op": name, "device": str(tensor.device), "caller": caller})
            return original(*args, **kwargs)

        setattr(dist, name, recorded)

    for _name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
        _wrap(_name)

    @atexit.register
    def _dump():
        folder = Path(os.environ["VLPDIST_COLLECTIVE_LOG"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(calls))
