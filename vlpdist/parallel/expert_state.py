"""Expert parameter names: per-EP-rank local ids <-> global ids.

DeepSpeed's MoE layer holds only its rank's experts, named
`...deepspeed_moe.experts.deepspeed_experts.<local_id>.<param>`; expert `local_id` on EP rank r is
global expert `r * experts_per_rank + local_id` (DeepSpeed's own expert checkpoint files use the
same numbering). A consolidated state dict names every expert by its global id, so it can be
reloaded at any `ep_size` that divides the number of experts.
"""

from __future__ import annotations

import re

_EXPERT_KEY = re.compile(r"^(?P<head>.*\.deepspeed_experts\.)(?P<expert_id>\d+)(?P<tail>\..+)$")


def local_to_global_expert_state(state: dict, ep_rank: int, experts_per_rank: int) -> dict:
    """Rename this rank's local expert params to global ids; other params are passed through."""
    renamed = {}
    for key, value in state.items():
        match = _EXPERT_KEY.match(key)
        if match:
            global_id = ep_rank * experts_per_rank + int(match["expert_id"])
            key = f"{match['head']}{global_id}{match['tail']}"
        renamed[key] = value
    return renamed


def global_to_local_expert_state(state: dict, ep_rank: int, experts_per_rank: int) -> dict:
    """Keep the experts EP rank `ep_rank` holds, renamed to local ids; other params are passed through."""
    first = ep_rank * experts_per_rank
    local = {}
    for key, value in state.items():
        match = _EXPERT_KEY.match(key)
        if match:
            global_id = int(match["expert_id"])
            if not first <= global_id < first + experts_per_rank:
                continue
            key = f"{match['head']}{global_id - first}{match['tail']}"
        local[key] = value
    return local
