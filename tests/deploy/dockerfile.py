"""A small Dockerfile reader: the instructions, in order, with continuation lines joined."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Instruction:
    keyword: str   # upper case: FROM, RUN, ENTRYPOINT, ...
    args: str      # the rest of the instruction, continuation lines joined with spaces
    line: int      # where it starts, 1-based

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, HEALTHCHECK's CMD), else None."""
        text = self.args.strip()
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3:].strip() if "CMD" in text else ""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse(path: Path) -> list[Instruction]:
    instructions, current, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):   # comments inside a continued instruction are dropped
            continue
        if not current:
            start = number
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        current = ""
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions split at each FROM (the global ARGs before the first FROM are dropped)."""
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out
