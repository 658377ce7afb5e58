"""HLO text (`Lowered.as_text(dialect="hlo")` or `Compiled.as_text()`) parsed once, for the
benchmarks that read it: FLOP counts (`bench_vs_torch`) and op categories (`profile_step`).
"""

from __future__ import annotations

import dataclasses
import re

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")
_CALLS = re.compile(r"(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass
class Instruction:
    name: str
    type: str  # e.g. 'f32[2,3]{1,0}', or a tuple type '(f32[2], s32[])'
    opcode: str
    operands: list[str]
    called: dict[str, list[str]]  # attribute (calls, to_apply, body, ...) -> computations
    op_name: str  # the metadata's op_name ('' when absent): named scopes show here
    body: str  # the text after the type: opcode, operands, attributes


@dataclasses.dataclass
class Computation:
    name: str
    instructions: dict[str, Instruction]
    root: str | None = None


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: str | None

    def instruction_types(self) -> dict[str, str]:
        """Instruction name -> type, over all computations (names are unique in a module)."""
        return {
            name: ins.type
            for comp in self.computations.values()
            for name, ins in comp.instructions.items()
        }


def split_type(rest: str) -> tuple[str, str]:
    """'f32[2,3]{1,0} convolution(...)' -> (type, remainder); tuple types included."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    type_, _, remainder = rest.partition(" ")
    return type_, remainder.lstrip()


def dims(type_: str) -> list[int]:
    """The dimensions of an array type ('f32[2,3]{1,0}' -> [2, 3]); [] for a scalar."""
    match = _SHAPE.search(type_)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _operands(body: str) -> list[str]:
    """Names of the operands in 'opcode(f32[2] %a, %b), attributes'."""
    args = body.split("(", 1)[1] if "(" in body else ""
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            end = i
            break
    names = [a.strip().split(" ")[-1].lstrip("%") for a in args[:end].split(",")]
    return [n for n in names if n]


def parse(text: str) -> Module:
    """Every computation of an HLO module with its instructions and root."""
    computations: dict[str, Computation] = {}
    entry, current = None, None
    for line in text.splitlines():
        if not line.startswith(" "):  # a computation's header, its closing brace, the module
            match = _COMPUTATION.match(line)
            current = None
            if match:
                current = Computation(match.group(2), {})
                computations[current.name] = current
                if match.group(1):
                    entry = current.name
            continue
        match = _INSTRUCTION.match(line)
        if current is None or not match:
            continue
        root, name, rest = match.groups()
        type_, body = split_type(rest)
        opcode = re.match(r"([\w\-]*)", body).group(1)
        called: dict[str, list[str]] = {}
        for attribute, computation in _CALLS.findall(body):
            called.setdefault(attribute, []).append(computation)
        for group in _BRANCHES.findall(body):
            called.setdefault("branch_computations", []).extend(
                c.strip().lstrip("%") for c in group.split(",")
            )
        op_name = _OP_NAME.search(body)
        current.instructions[name] = Instruction(
            name=name,
            type=type_,
            opcode=opcode,
            operands=_operands(body),
            called=called,
            op_name=op_name.group(1) if op_name else "",
            body=body,
        )
        if root:
            current.root = name
    return Module(computations, entry)
