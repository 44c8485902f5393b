"""Reading a compiled kernel: SASS loops and memory instructions, and which Triton loads are tiles.

``analyse(cubin, ttgir)`` disassembles with the ``nvdisasm`` shipped in the Triton wheel (with line
info), finds loop bodies from backward branches, and classifies every global memory instruction
(LDG / STG width from its SASS form, LDGSTS async copies, cp.async.bulk = UBLKCP, TMA = UTMALDG /
UTMASTG) and tensor-core instruction (HMMA / HGMMA / IMMA / DMMA). Each instruction carries the
innermost source line it came from; the TTGIR says which source lines load or store 2-d (or larger)
tiles, so a narrow access can be told apart from a legitimately scalar per-row vector (den, row
weights, z).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

TENSOR_CORE_OPS = ("HMMA", "HGMMA", "IMMA", "DMMA")   # (HFMA2.MMA is a plain FMA on the MMA pipe)
GLOBAL_LOADS = ("LDG",)
GLOBAL_STORES = ("STG",)
ASYNC_COPIES = ("LDGSTS", "UBLKCP", "UTMALDG", "UTMASTG", "UBLKRED", "UTMAREDG")
GLOBAL_ATOMICS = ("RED", "ATOM", "ATOMG")
SHARED_STORES = ("STS",)

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def nvidia_bin(tool: str) -> str:
    """Path of a CUDA tool shipped inside the installed Triton wheel."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


@dataclass
class Instr:
    addr: int
    opcode: str           # e.g. "LDG.E.128" (predicate stripped)
    text: str
    loc: tuple            # (file basename, line) of the innermost source location, or ("?", 0)

    @property
    def family(self) -> str:
        return self.opcode.split(".")[0]


def access_width(opcode: str) -> int:
    """Bits moved per thread by a global load/store/async copy, from its SASS form."""
    parts = opcode.split(".")[1:]
    if "128" in parts:
        return 128
    if "64" in parts:
        return 64
    if {"U16", "S16"} & set(parts):
        return 16
    if {"U8", "S8"} & set(parts):
        return 8
    return 32


def tensor_core_flops(opcode: str) -> int:
    """Dense FLOPs of one warp-level (HMMA) or warpgroup-level (HGMMA) tensor-core instruction."""
    m = re.search(r"\.(\d+)x(\d+)x(\d+)\.", opcode + ".")       # HGMMA.64x64x16.F32.BF16
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c
    m = re.search(r"\.(\d)(\d)(\d+)\.", opcode + ".")            # HMMA.16816 / HMMA.1684 / DMMA.884
    if m:
        digits = m.group(0).strip(".")
        for split in ((2, 1), (2, 2), (1, 1)):   # 16 8 16 | 16 8 8 | 8 8 4
            a, b, c = digits[:split[0]], digits[split[0]:split[0] + split[1]], digits[split[0] + split[1]:]
            if a and b and c and int(a) in (8, 16) and int(b) == 8:
                return 2 * int(a) * int(b) * int(c)
    return 0


@dataclass
class Loop:
    start: int
    end: int
    instrs: list = field(default_factory=list)
    innermost: bool = True


def disassemble(cubin: bytes) -> list[Instr]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([nvidia_bin("nvdisasm"), "-c", "-gi", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.remove(path)
    instrs, labels, loc, fresh = [], {}, ("?", 0), True
    pending_labels = []
    for line in out.splitlines():
        s = line.strip()
        m = _LINE.search(s)
        if m:
            if fresh:                      # the first location line after an instruction is the innermost
                loc, fresh = (os.path.basename(m.group(1)), int(m.group(2))), False
            continue
        m = _LABEL.match(s)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _INSTR.search(s)
        if m:
            addr, text = int(m.group(1), 16), m.group(2).strip()
            body = re.sub(r"^@!?U?P[T\d]+\s+", "", text)
            opcode = body.split()[0] if body else ""
            for lab in pending_labels:
                labels[lab] = addr
            pending_labels = []
            instrs.append(Instr(addr, opcode, body, loc))
            fresh = True
    for ins in instrs:
        ins.target = None
        if ins.family in ("BRA", "JMP"):
            t = _TARGET.search(ins.text)
            if t and t.group(1) in labels:
                ins.target = labels[t.group(1)]
    return instrs


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Loop bodies [target, branch] of backward branches (several back edges to one head merge)."""
    spans = {}
    for ins in instrs:
        if ins.target is not None and ins.target < ins.addr:
            spans[ins.target] = max(spans.get(ins.target, 0), ins.addr)
    loops = [Loop(s, e, [i for i in instrs if s <= i.addr <= e]) for s, e in sorted(spans.items())]
    for a in loops:
        a.innermost = not any(b is not a and a.start <= b.start and b.end <= a.end for b in loops)
    return loops


def tile_lines(ttgir: str) -> dict:
    """(file basename, line) -> rank of the largest tensor a global load/store on that line moves."""
    locs = {}
    for m in re.finditer(r"^#(loc\d*) = loc\((.*)\)\s*$", ttgir, re.M):
        locs[m.group(1)] = m.group(2)

    def resolve(expr: str, depth: int = 0):
        expr = expr.strip()
        if depth > 50:
            return None
        m = re.match(r'^"([^"]+)":(\d+)', expr)
        if m:
            return os.path.basename(m.group(1)), int(m.group(2))
        m = re.match(r"^callsite\(#(loc\d*) at", expr)
        if m:
            return resolve(locs.get(m.group(1), ""), depth + 1)
        m = re.match(r'^"[^"]*"\(#(loc\d*)\)', expr)
        if m:
            return resolve(locs.get(m.group(1), ""), depth + 1)
        m = re.match(r"^#(loc\d*)$", expr)
        if m:
            return resolve(locs.get(m.group(1), ""), depth + 1)
        m = re.match(r"^fused\[(#loc\d*)", expr)
        if m:
            return resolve(m.group(1), depth + 1)
        return None

    ranks = {}
    ops = r"(tt\.load|tt\.store|ttg\.async_copy_global_to_local|tt\.atomic_rmw)"
    for line in ttgir.splitlines():
        if not re.search(ops, line):
            continue
        t = re.search(r"tensor<([\dx]+)x!tt\.ptr<", line)
        rank = len(t.group(1).split("x")) if t else 0
        m = re.search(r"loc\((#loc\d*|\"[^)]*)\)\s*$", line)
        where = resolve(m.group(1)) if m else None
        if where:
            ranks[where] = max(ranks.get(where, 0), rank)
    return ranks


def memory_summary(instrs: list[Instr], tiles: dict) -> dict:
    """Counts of global accesses by kind and width, async copies, shared stores (STS) by width and
    tensor-core instructions."""
    out = dict(instructions=len(instrs), loads={}, stores={}, async_copies={}, shared_stores={}, atomics=0,
               tensor_core=0,
               tensor_core_kinds={}, warp_mma_flops=0, warpgroup_mma_flops=0, narrow_tile_accesses=[],
               narrow_accesses=[], load_bits=0)
    for ins in instrs:
        fam = ins.family
        if fam in GLOBAL_LOADS or fam in GLOBAL_STORES or fam in ASYNC_COPIES:
            width = access_width(ins.opcode)
            kind = "loads" if fam in GLOBAL_LOADS else "stores" if fam in GLOBAL_STORES else "async_copies"
            key = f"{fam}.{width}" if kind == "async_copies" else str(width)
            out[kind][key] = out[kind].get(key, 0) + 1
            if fam in GLOBAL_LOADS or fam == "LDGSTS":
                out["load_bits"] += width
            if width < 64 and fam in GLOBAL_LOADS + GLOBAL_STORES + ("LDGSTS",):
                where = f"{ins.loc[0]}:{ins.loc[1]}"
                # A volatile load (.STRONG.SYS) is never a tile's: the kernels load only scalars volatile
                # (the packed calls' sequence table), and ptxas's line table can put those on the line of
                # a neighbouring tile load.
                if tiles.get(ins.loc, 0) >= 2 and ".STRONG.SYS" not in ins.opcode:
                    out["narrow_tile_accesses"].append(f"{ins.opcode}@{where}")
                out["narrow_accesses"].append(f"{ins.opcode}@{where}")
        elif fam in GLOBAL_ATOMICS:
            out["atomics"] += 1
        elif fam in SHARED_STORES:     # register -> shared stores (STS.128, STS.64, STS, STS.U16, ...)
            key = str(access_width(ins.opcode))
            out["shared_stores"][key] = out["shared_stores"].get(key, 0) + 1
        elif fam in TENSOR_CORE_OPS:
            out["tensor_core"] += 1
            out["tensor_core_kinds"][ins.opcode] = out["tensor_core_kinds"].get(ins.opcode, 0) + 1
            # HMMA / IMMA / DMMA: one warp's product; HGMMA (wgmma): one warpgroup's (4 warps issue it).
            out["warpgroup_mma_flops" if fam == "HGMMA" else "warp_mma_flops"] += tensor_core_flops(ins.opcode)
    for key in ("narrow_tile_accesses", "narrow_accesses"):
        out[key] = sorted(set(out[key]))
    return out


def cta_mma_flops(summary: dict, num_warps: int) -> int:
    """Tensor-core FLOPs a CTA of ``num_warps`` warps performs running the instructions of ``summary`` once."""
    return summary["warp_mma_flops"] * num_warps + summary["warpgroup_mma_flops"] * num_warps // 4


def analyse(cubin: bytes, ttgir: str) -> dict:
    """Whole-kernel and per-loop summaries; ``main_loop`` is the innermost loop with the most
    tensor-core instructions (else the one loading the most bytes per iteration), None if no loop."""
    instrs = disassemble(cubin)
    tiles = tile_lines(ttgir)
    instrs = [i for i in instrs if i.family != "NOP"]                   # alignment padding
    loops = [lp for lp in find_loops(instrs) if len(lp.instrs) > 1]   # drop the `BRA self` tail pad
    summaries = []
    for lp in loops:
        s = memory_summary(lp.instrs, tiles)
        s.update(start=lp.start, end=lp.end, innermost=lp.innermost)
        summaries.append(s)
    inner = [s for s in summaries if s["innermost"]]
    main = max(inner, key=lambda s: (s["tensor_core"], s["load_bits"], s["instructions"]), default=None)
    in_loops = {i.addr for lp in loops for i in lp.instrs}
    return dict(kernel=memory_summary(instrs, tiles), loops=summaries, main_loop=main,
                outside_loops=sum(1 for i in instrs if i.addr not in in_loops and i.family != "NOP"
                                  and i.target != i.addr),
                tile_lines=sorted(f"{f}:{n}" for (f, n), r in tiles.items() if r >= 2))
