"""Every collective of a compiled step, read from its optimized HLO: what it moves, how often per step, and whether
it stays inside a slice (ICI) or crosses slices over the data-centre network (DCN).

Two ways a collective crosses slices:
  * the TPU compiler of a multi-slice program compiles one slice's program: its collectives run over that slice's
    chips, and what crosses slices is a `send` to the megascale runtime, one per transfer, whose
    `_xla_megascale_transfer_type` (ALL_REDUCE, ALL_GATHER, ONE_TO_ONE, ...) names the collective it serves;
  * any other compiler (XLA:CPU with simulated slices) compiles one program for every device: a collective crosses
    slices when one of its device groups holds devices of two slices.
Device groups come in three spellings: `{{0,1},{2,3}}`, iota `[2,4]<=[4,2]T(1,0)` and mesh
`mesh['axis_0'=2,'axis_1'=4] device_ids=([4,2]T(1,0)) {'axis_1'}`; the ids index the program's device assignment,
the mesh's devices in order.

A collective inside a loop (the layer scan, micro-batches) runs once per iteration: its count is the product of the
trip counts of the loops around it (`known_trip_count`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_TRANSFER_OPS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
                 "ALL_TO_ALL": "all-to-all", "ONE_TO_ONE": "collective-permute"}


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # one of OPS
    name: str
    bytes: int  # the array it moves, per device, per call
    count: int  # calls per step (loop trip counts multiplied)
    group: int  # devices taking part in one group (0 where unknown: a DCN send)
    dcn: bool  # crosses slices

    @property
    def step_bytes(self) -> int:
        return self.bytes * self.count


def array_bytes(shape_text: str) -> list[int]:
    """Bytes of every array in an HLO shape (one array or a tuple), in order; scalars included."""
    return [_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _ARRAY.findall(shape_text) if dtype in _BYTES]


def _moved(op: str, shape_text: str) -> int:
    sizes = array_bytes(shape_text)
    if op.endswith("-start"):  # async: a tuple of (operands..., results..., scratch scalars)
        return max(sizes, default=0)
    return sum(sizes)


def groups(attributes: str, devices: int) -> list[list[int]] | None:
    """The device groups of one collective's attributes (replica_groups or source_target_pairs); None if absent."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
    if pairs:
        return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)", pairs.group(1) + "}")]
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attributes)
    if explicit:
        found = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
        return [g for g in found if g] or [list(range(devices))]
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attributes)
    if iota:
        g, s, dims, perm = iota.groups()
        return _iota(dims, perm).reshape(int(g), int(s)).tolist()
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? "
                     r"\{([^}]*)\}", attributes)
    if mesh:
        axes = re.findall(r"'(\w+)'=(\d+)", mesh.group(1))
        names, shape = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = (_iota(mesh.group(2), mesh.group(3)) if mesh.group(2) else np.arange(math.prod(shape))).reshape(shape)
        over = [names.index(a) for a in re.findall(r"'(\w+)'", mesh.group(4))]
        rest = [i for i in range(len(shape)) if i not in over]
        return ids.transpose(rest + over).reshape(-1, math.prod(shape[i] for i in over)).tolist()
    return None


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return (ids.transpose([int(p) for p in perm.split(",")]) if perm else ids).reshape(-1)


def _computations(hlo: str) -> tuple[dict, str]:
    """{computation: [instruction lines]} and the entry computation's name."""
    comps, current, entry = collections.defaultdict(list), None, None
    for line in hlo.splitlines():
        head = _HEADER.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and line.startswith(" "):
            comps[current].append(line)
    return comps, entry


def _trips(line: str, comps: dict) -> int:
    """A while loop's trip count: XLA's `known_trip_count` (XLA:CPU, GPU), else the bound its condition compares
    the counter against (the TPU compiler's loops count from 0 to a constant: `compare(counter, 44), direction=LT`)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", line)
    body = "\n".join(comps.get(condition.group(1), ())) if condition else ""
    bound = re.findall(r"s32\[\]\S* constant\((\d+)\)", body)
    return int(bound[0]) if len(bound) == 1 and "direction=LT" in body else 1


def _counts(comps: dict, entry: str) -> dict[str, int]:
    """How many times per step each computation runs: loop bodies their trip count times their caller's."""
    counts = collections.Counter()

    def visit(name: str, times: int):
        counts[name] += times
        for line in comps.get(name, ()):
            callees = _CALLS.findall(line)
            branches = _BRANCHES.search(line)
            if branches:
                callees += re.findall(r"%?([\w.\-]+)", branches.group(1))
            for callee in callees:
                if callee in comps and callee != name:
                    loop = " while(" in line and re.search(rf"body=%?{re.escape(callee)}\b", line)
                    visit(callee, times * (_trips(line, comps) if loop else 1))

    visit(entry, 1)
    return counts


def collectives(hlo: str, device_slices: list[int]) -> list[Collective]:
    """The collectives of a compiled program's text (`compiled.as_text()`); `device_slices[i]` is the slice of the
    i-th device of its device assignment."""
    comps, entry = _computations(hlo)
    counts = _counts(comps, entry)
    out = []
    for comp, lines in comps.items():
        if not counts.get(comp):
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, op, rest = m.groups()
            transfer = _TRANSFER.search(rest) if op == "send" else None
            if transfer:  # a DCN transfer (its recv is the other end of the same bytes)
                kind = _TRANSFER_OPS.get(transfer.group(1), transfer.group(1).lower())
                out.append(Collective(kind, name, array_bytes(shape)[0], counts[comp], 0, True))
                continue
            base = op.removesuffix("-start")
            if base not in OPS or op.endswith("-done"):
                continue
            found = groups(rest, len(device_slices))
            group = len(found[0]) if found else 0
            dcn = bool(found) and any(len({device_slices[i] for i in g if i < len(device_slices)}) > 1 for g in found)
            out.append(Collective(base, name, _moved(op, shape), counts[comp], group, dcn))
    return out


def summary(found: list[Collective]) -> dict:
    """Bytes per step per device: {"ici": ..., "dcn": ..., "by_op": {(op, "ici"/"dcn"): [calls, bytes]}}."""
    by_op = collections.defaultdict(lambda: [0, 0])
    for c in found:
        key = f"{c.op} {'dcn' if c.dcn else 'ici'}"
        by_op[key][0] += c.count
        by_op[key][1] += c.step_bytes
    return {"ici": sum(c.step_bytes for c in found if not c.dcn), "dcn": sum(c.step_bytes for c in found if c.dcn),
            "by_op": {k: {"calls": v[0], "bytes": v[1]} for k, v in sorted(by_op.items())}}
