"""Loaded at interpreter start by the rank processes of one test (this folder first on PYTHONPATH):
records every torch.distributed tensor collective made while vlpdist code is on the stack, with
the tensor's device, the nearest vlpdist function and whether vlpdist called torch.distributed
itself (`direct`) or through DeepSpeed, into $VLPDIST_COLLECTIVE_LOG/rank<RANK>_<pid>.json at exit.

DeepSpeed calls torch.distributed through its comm module, so wrapping the functions on the
torch.distributed module catches every caller."""

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
        """(nearest vlpdist function, whether it called torch.distributed itself) or (None, False)."""
        frame = direct = sys._getframe(2)  # the caller of the wrapped collective
        while frame is not None:
            if frame.f_code.co_filename.startswith(LIBRARY):
                return f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}", frame is direct
            frame = frame.f_back
        return None, False

    def _wrap(name):
        original = getattr(dist, name)

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            caller, direct = _vlpdist_caller()
            if caller is not None:
                tensor = args[0] if args else next(iter(kwargs.values()))
                calls.append({"op": name, "device": str(tensor.device), "caller": caller, "direct": direct})
            return original(*args, **kwargs)

        setattr(dist, name, recorded)

    for _name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
        _wrap(_name)

    @atexit.register
    def _dump():
        if not calls:  # the launcher processes, which run no vlpdist code
            return
        folder = Path(os.environ["VLPDIST_COLLECTIVE_LOG"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{os.environ.get('RANK', '0')}_{os.getpid()}.json").write_text(json.dumps(calls))
