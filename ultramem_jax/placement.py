"""Skip-layer placement of memory layers (method notes A.1).

``"2:5/6:9"`` means: memory 0 reads the pre-FFN normalised hidden state of block 2 and its output is added to
the residual stream right after block 5; memory 1 reads block 6 and adds after block 9.  Blocks are 0-based.
``"i:i"`` adds after the block it reads, i.e. in parallel with that block's FFN (UltraMemV2's placement);
``"all"`` puts one such memory in every block.  Only one memory output is in flight at a time, so ranges may
not overlap: each memory must start after the previous one has been added.
"""
from __future__ import annotations


def parse_placement(spec: str, num_layers: int, field: str = "memory_placement") -> list[tuple[int, int]]:
    spec = (spec or "").strip()
    if not spec:
        return []
    if spec == "all":
        return [(i, i) for i in range(num_layers)]
    ranges = []
    for part in spec.split("/"):
        try:
            read, add = (int(p) for p in part.split(":"))
        except ValueError:
            raise ValueError(f"{field}: {part!r} is not 'read:add' (e.g. '2:5/6:9' or 'all')") from None
        if read < 0 or add >= num_layers:
            raise ValueError(f"{field}: {part!r} names a block outside 0..{num_layers - 1}")
        if add < read:
            raise ValueError(f"{field}: {part!r} adds the output before the block it reads")
        if ranges and read <= ranges[-1][1]:
            raise ValueError(f"{field}: {part!r} overlaps or precedes {ranges[-1][0]}:{ranges[-1][1]} "
                             "(ranges must be increasing and disjoint)")
        ranges.append((read, add))
    return ranges
