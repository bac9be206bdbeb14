"""The shell commands of a Markdown file's ```bash blocks, one per command line, in file order.

A command is what a user would paste as one line: backslash continuations joined, a line whose quotes are still open
(or that ends in `&&` / `|`) joined with the next, comment-only lines dropped, a trailing `# ...` comment cut (a `#`
inside quotes or inside a word is kept). `&&` and `;` are not split: a command runs as the line is written.
"""

import dataclasses
import re

_FENCE = re.compile(r"^```(\S*)\s*$")
_HEADING = re.compile(r"^(#{2,3})\s+(.*?)\s*$")
_TAG = re.compile(r"^<!-- (/?)section:(\S+) -->")  # README's section markers, opening and closing


@dataclasses.dataclass(frozen=True)
class Command:
    file: str     # "README.md"
    line: int     # 1-based line where the command starts
    section: str  # the nearest "## " / "### " heading above it
    tag: str      # the nearest `<!-- section:TAG -->` marker above it ("" where there is none)
    text: str     # the command as bash would run it (comments removed)


def strip_comment(line: str) -> tuple[str, bool]:
    """(line without a trailing `# comment`, whether its quotes are still open at the end)."""
    quote = ""
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), False
    return line.rstrip(), bool(quote)


def _open_quote(text: str) -> bool:
    return strip_comment(text)[1]


def commands(markdown: str, file: str = "README.md") -> list[Command]:
    out = []
    section, tag, in_block, pending, start = "", "", False, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = _FENCE.match(line)
        if fence and not in_block:
            in_block, lang = True, fence.group(1)
            collect = lang in ("bash", "sh", "shell")
            continue
        if fence and in_block and not fence.group(1):
            in_block = False
            if pending.strip():
                raise ValueError(f"{file}:{start}: command continues past the end of its block: {pending!r}")
            continue
        if not in_block:
            heading, marker = _HEADING.match(line), _TAG.match(line)
            if heading:
                section = heading.group(2)
            if marker:
                tag = "" if marker.group(1) else marker.group(2)
            continue
        if not collect:
            continue
        if not pending:
            start = number
        joined = pending + (line.lstrip() if pending.endswith(" ") else line)
        if _open_quote(joined):  # a quoted argument spans lines: keep the newline, as bash does
            pending = joined + "\n"
            continue
        code, _ = strip_comment(joined)
        if code.endswith("\\"):
            pending = code[:-1].rstrip() + " "
            continue
        if code.endswith(("&&", "||", "|")):
            pending = code + " "
            continue
        pending = ""
        if code.strip():
            out.append(Command(file, start, section, tag, code.strip()))
    return out
