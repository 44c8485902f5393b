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


# ------------------------------------------------------------------------------------------------
# Latency readouts: dependent round trips, barriers, wgmma waits, shared stores

SYNC_LOADS = ("LDG", "LD", "ATOMG", "ATOM")    # the result lands in registers (scoreboarded)
_REG = re.compile(r"(?<![\w.])R(\d+)(\.64)?(?![\w])")


def _registers(operands: str) -> set:
    """Register numbers an operand string names (``R12.64`` names R12 and R13)."""
    out = set()
    for m in _REG.finditer(operands):
        n = int(m.group(1))
        out.update((n, n + 1) if m.group(2) else (n,))
    return out


def _operands(ins: Instr) -> str:
    return ins.text.split(None, 1)[1] if " " in ins.text else ""


def _load_dest(ins: Instr) -> set:
    """Registers a synchronous global load (or atomic with a result) writes."""
    ops = [o.strip() for o in _operands(ins).split(",")]
    first = next((o for o in ops if not re.fullmatch(r"!?U?P(T|\d+)", o)), "")   # skip predicate outputs
    m = _REG.match(first)
    if not m:
        return set()
    n = int(m.group(1))
    return set(range(n, n + max(1, access_width(ins.opcode) // 32)))


def shared_store_width(opcode: str) -> int:
    """Bits per thread of an STS (``STS`` alone is 32-bit)."""
    return access_width(opcode)


def latency_chain(body: list[Instr], steady: bool = True) -> dict:
    """Dependent global round trips, barriers, wgmma waits and shared stores of one pass over ``body``.

    The round-trip rule (loads are LDG / LD / ATOM(G) with a result register, LDGSTS cp.async copies,
    UTMALDG TMA loads). Walk the body in program order keeping the loads in flight. An instruction
    *consumes* an in-flight load when it names one of the registers the load writes (any operand:
    a read, or a write that must wait on the scoreboard), when it is ``DEPBAR.LE SB0, n`` and the
    load's committed cp.async group is older than the newest n groups, or when it is a
    ``SYNCS.PHASECHK`` wait and the load is a TMA load. At a consumer the warp stalls until the
    consumed load returns. Every synchronous load still in flight was issued before the consumer,
    within the same stall window, and is taken to have returned with it (at a cp.async / TMA wait:
    those issued before the newest load waited for); all of them retire together: one round trip,
    however many loads were in flight together (independent loads overlap; only a chain costs).
    This undercounts a load issued long after the one waited for (it retires for free).

    With ``steady`` the body is walked four times (iterations i - 3 .. i: cp.async pipelines keep
    up to num_stages - 1 iterations of loads in flight) and only iteration i's consumers count. For
    each, ``cover`` lists the instructions the warp issued between the oldest load it retires and
    itself (across the back edge where the load came from an earlier iteration): they overlap the
    latency, the rest of it is a stall. A consumer whose cover is shorter than one loop body is an
    exposed round trip (``round_trips``: less than an iteration of work overlaps it); one at least a
    body long was software-pipelined (``pipelined``). Without ``steady`` (straight-line code) the
    body is walked once. Loads never consumed in the walk are not round trips of this body.

    Also: ``barriers`` (BAR.SYNC / BAR.RED: the CTA waits for its slowest warp; BAR.ARV does not
    wait), ``wgmma_waits`` (WARPGROUP.DEPBAR: the warpgroup waits for its tensor-core chain),
    ``shared_stores`` {bits per thread: STS count}, ``loads`` (global load instructions).
    """
    passes = (0, 1, 2, 3) if steady else (3,)
    pending = []            # dicts: it, pos, regs, kind ("sync" | "cp" | "tma"), group
    committed, pos = 0, 0
    out = dict(round_trips=0, pipelined=0, barriers=0, wgmma_waits=0, shared_stores={}, loads=0, cover=[])
    for it in passes:
        for ins in body:
            pos += 1
            fam, ops = ins.family, _operands(ins)
            hit = []
            if pending:
                regs = _registers(ops)
                hit = [p for p in pending if p["kind"] == "sync" and p["regs"] & regs]
                if fam == "DEPBAR":
                    m = re.search(r"SB0\s*,\s*(0x[0-9a-f]+|\d+)", ops)
                    keep = int(m.group(1), 0) if m else 0
                    hit += [p for p in pending if p["kind"] == "cp" and p["group"] is not None
                            and p["group"] <= committed - keep]
                elif fam == "SYNCS" and "PHASECHK" in ins.opcode:
                    hit += [p for p in pending if p["kind"] == "tma"]
            if hit:
                # A register wait retires every synchronous load in flight (issued before it, so no
                # later than the one waited for); a cp.async / TMA wait, the loads it waits for and
                # the synchronous loads issued before the newest of them.
                last = pos if any(p["kind"] == "sync" for p in hit) else max(p["pos"] for p in hit)
                retired = hit + [p for p in pending if p not in hit and p["kind"] == "sync" and p["pos"] <= last]
                pending = [p for p in pending if p not in retired]
                if it == 3:    # instructions issued while the oldest retired load was in flight
                    cover = pos - min(p["pos"] for p in retired) - 1
                    out["round_trips" if cover < len(body) else "pipelined"] += 1
                    out["cover"].append(cover)
            if fam in SYNC_LOADS:
                dest = _load_dest(ins)
                if dest:
                    pending.append(dict(it=it, pos=pos, regs=dest, kind="sync", group=None))
            elif fam == "LDGSTS":
                pending.append(dict(it=it, pos=pos, regs=set(), kind="cp", group=None))
            elif fam == "UTMALDG":
                pending.append(dict(it=it, pos=pos, regs=set(), kind="tma", group=None))
            elif fam == "LDGDEPBAR":
                committed += 1
                for p in pending:
                    if p["kind"] == "cp" and p["group"] is None:
                        p["group"] = committed
            if it != 3:
                continue
            if fam in SYNC_LOADS + ("LDGSTS", "UTMALDG"):
                out["loads"] += 1
            elif fam == "BAR" and ".ARV" not in ins.opcode:
                out["barriers"] += 1
            elif ins.opcode.startswith("WARPGROUP.DEPBAR"):
                out["wgmma_waits"] += 1
            elif fam == "STS":
                w = shared_store_width(ins.opcode)
                out["shared_stores"][w] = out["shared_stores"].get(w, 0) + 1
    return out


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
        # The loop's own instructions (nested loops taken out) for its latency chain and issue count.
        inner = {i.addr for b in loops if b is not lp and lp.start <= b.start and b.end <= lp.end
                 for i in b.instrs}
        own = [i for i in lp.instrs if i.addr not in inner]
        branch = next((i for i in reversed(lp.instrs) if i.target == lp.start), lp.instrs[-1])
        parents = [b for b in loops if b is not lp and b.start <= lp.start and lp.end <= b.end]
        s.update(start=lp.start, end=lp.end, innermost=lp.innermost, own_instructions=len(own),
                 chain=latency_chain(own), back_edge=f"{branch.loc[0]}:{branch.loc[1]}",
                 parent=min(parents, key=lambda b: b.end - b.start).start if parents else None)
        summaries.append(s)
    inner = [s for s in summaries if s["innermost"]]
    main = max(inner, key=lambda s: (s["tensor_core"], s["load_bits"], s["instructions"]), default=None)
    in_loops = {i.addr for lp in loops for i in lp.instrs}
    outside = [i for i in instrs if i.addr not in in_loops and i.target != i.addr]
    return dict(kernel=memory_summary(instrs, tiles), loops=summaries, main_loop=main,
                outside_chain=latency_chain(outside, steady=False),
                outside_loops=sum(1 for i in instrs if i.addr not in in_loops and i.family != "NOP"
                                  and i.target != i.addr),
                tile_lines=sorted(f"{f}:{n}" for (f, n), r in tiles.items() if r >= 2))
