"""Preprocessing spread over N independent jobs, then merged: the inputs are split into N runs of whole files in
their order (balanced by bytes), part i tokenizes run i into its own pair (`PREFIX.part-0000i-of-0000N`), and
`merge` concatenates pairs into one without tokenizing again, as GPT-NeoX's merge_datasets does (each pair's
documents after the previous pair's, the index offset to match), so N parts merged are byte-identical to one run
over every input. The merge streams: a block of tokens and a block of lengths at a time, so memory stays flat
whatever the size, and it hashes as it writes, so the merged manifest costs no second read.

The parts run as N local processes, or as a SLURM job array that one command writes and submits, with the merge as
a job that starts when every part has succeeded (`slurm_scripts`). Every part resumes (`--resume`), so a requeued
array task continues where it stopped.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from typing import Sequence

from neox_jax import errors, files
from neox_jax.data import indexed, manifest


def part_prefix(output_prefix: str, part: int, parts: int) -> str:
    return f"{output_prefix}.part-{part:05d}-of-{parts:05d}"


def _weight(name: str) -> int:
    return os.path.getsize(name) if os.path.isfile(name) else 1


def split(inputs: Sequence[str], parts: int) -> list[list[str]]:
    """`inputs` in `parts` consecutive runs of whole files, each near 1/parts of the bytes, none empty."""
    if not 1 <= parts <= len(inputs):
        raise errors.InputError(f"--parts {parts}: the inputs are split by whole files, and there are {len(inputs)} "
                                f"(give at most {len(inputs)} parts, or more, smaller input files)")
    sizes = [_weight(n) for n in inputs]
    total, done, groups = sum(sizes), 0, [[]]
    for i, (name, size) in enumerate(zip(inputs, sizes)):
        parts_left = parts - len(groups)  # parts after the current one
        if groups[-1] and parts_left and (done + size / 2 > total * len(groups) / parts
                                          or len(inputs) - i == parts_left):
            groups.append([])
        groups[-1].append(name)
        done += size
    return groups


def merge(prefixes: Sequence[str], output_prefix: str, overwrite: bool = False, command=None,
          expect_inputs: Sequence[Sequence[str]] | None = None) -> dict:
    """Concatenate the pairs `prefixes`, in that order, into `output_prefix` (atomically, with its manifest); returns
    {documents, tokens, bytes, seconds}. Pairs of different token types or of different tokenizers (their manifests
    say) are refused before anything is written; expect_inputs: each pair's inputs as its manifest must list them
    (the parts of one preprocessing run)."""
    start = time.perf_counter()
    records = [_part_record(p, i, expect_inputs) for i, p in enumerate(prefixes)]
    known = [(p, r) for p, r in zip(prefixes, records) if r]
    for p, r in known[1:]:
        if r["tokenizer"]["sha256"] != known[0][1]["tokenizer"]["sha256"]:
            first, rec = known[0]
            raise errors.InputError(
                f"merge: {p} was tokenized with {r['tokenizer']['path']} (sha256 {r['tokenizer']['sha256'][:12]}), "
                f"{first} with {rec['tokenizer']['path']} (sha256 {rec['tokenizer']['sha256'][:12]}); pairs of "
                "different tokenizers cannot be merged; nothing was written")
    dtypes = {p: indexed.read_header(p + ".idx")[0] for p in prefixes}
    if len(set(dtypes.values())) > 1:
        names = ", ".join(f"{p} {d.name}" for p, d in dtypes.items())
        raise errors.InputError(f"merge: the pairs hold tokens of different types ({names}): tokenized with "
                                "vocabularies of different sizes; nothing was written")
    indexed_out = indexed.strip_suffix(os.fspath(output_prefix))
    files_out = [indexed_out + ".bin", indexed_out + ".idx"]
    files.check_new(files_out, "--output-prefix", overwrite)
    with indexed.IndexedWriter(indexed_out, dtypes[prefixes[0]]) as w:
        for p in prefixes:
            w.append_pair(p)
    tokenizer = known[0][1]["tokenizer"] if known else None
    inputs = [i for r in records for i in r["inputs"]] if len(known) == len(records) else list(prefixes)
    manifest.write(indexed_out, tokenizer, inputs, command, sha256=w.sha256,
                   merged=[{"prefix": p, "manifest_sha256": manifest.manifest_sha256(p)} for p in prefixes])
    return {"documents": w.num_docs, "tokens": w.num_tokens, "bytes": w.num_tokens * w.dtype.itemsize,
            "seconds": time.perf_counter() - start}


def _part_record(prefix: str, i: int, expect_inputs) -> dict | None:
    if not indexed.exists(prefix):
        hint = f" (part {i}: run it with --part {i})" if expect_inputs is not None else ""
        raise errors.InputError(f"merge: {prefix}.bin/.idx not found{hint}; nothing was written")
    record = manifest.read(prefix) if os.path.isfile(manifest.path_of(prefix)) else None
    if expect_inputs is not None:
        listed = [r["name"] for r in (record or {}).get("inputs", [])]
        if listed != list(expect_inputs[i]):
            raise errors.InputError(
                f"merge: {prefix} was made from other inputs ({len(listed)} file(s): {', '.join(listed[:2])}...) than "
                f"part {i} of these ({len(expect_inputs[i])}: {', '.join(expect_inputs[i][:2])}...); run that part "
                f"again (--part {i} --overwrite); nothing was written")
    return record


def complete(prefix: str, inputs: Sequence[str]) -> bool:
    """Whether `prefix` is a finished part made from `inputs` (a local run skips it)."""
    if not (indexed.exists(prefix) and os.path.isfile(manifest.path_of(prefix))):
        return False
    return [r["name"] for r in manifest.read(prefix).get("inputs", [])] == list(inputs)


def run_local(commands: Sequence[Sequence[str]], log=print) -> None:
    """Run each part's command as a process, all at once; raises naming the parts that failed."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for cmd in commands]
    failed = []
    for i, proc in enumerate(procs):
        _, err = proc.communicate()
        if proc.returncode:
            last = (err.strip().splitlines() or ["(no output)"])[-1]
            failed.append(f"part {i} (exit {proc.returncode}): {last}")
        else:
            log(f"part {i} of {len(commands)} done")
    if failed:
        raise errors.InputError("preprocessing parts failed (the finished ones are kept, the others resume with "
                                "--resume): " + "; ".join(failed))


def slurm_scripts(part_command: Sequence[str], merge_command: Sequence[str], parts: int, output_prefix: str,
                  cpus: int, sbatch_args: Sequence[str] = ()) -> tuple[str, str]:
    """Write the job array (task i runs `part_command` with --part i) and the merge job beside the output; returns
    their paths. Both run from this working directory; logs go beside the parts."""
    name = os.path.basename(output_prefix) or "data"
    extra = "".join(f"#SBATCH {a}\n" for a in sbatch_args)
    head = f"#!/bin/bash\n#SBATCH --job-name=preprocess-{name}\n#SBATCH --nodes=1\n#SBATCH --ntasks=1\n"
    array = (head + f"#SBATCH --array=0-{parts - 1}\n#SBATCH --cpus-per-task={cpus}\n#SBATCH --requeue\n"
             f"#SBATCH --output={output_prefix}.part-%a.log\n{extra}"
             "# one part of the inputs per array task; a requeued task resumes where it stopped\n"
             f"cd {shlex.quote(os.getcwd())}\n"
             f"exec {shlex.join(part_command)} --part \"$SLURM_ARRAY_TASK_ID\" --resume\n")
    merge_job = (head + f"#SBATCH --cpus-per-task=1\n#SBATCH --output={output_prefix}.merge.log\n{extra}"
                 "# started by the submitting command once every part has succeeded (--dependency=afterok)\n"
                 f"cd {shlex.quote(os.getcwd())}\nexec {shlex.join(merge_command)}\n")
    paths = (output_prefix + ".parts.sbatch", output_prefix + ".merge.sbatch")
    for path, text in zip(paths, (array, merge_job)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return paths


def submit(array_script: str, merge_script: str) -> tuple[str, str]:
    """sbatch the array, then the merge to start after every task succeeded; returns both job ids."""
    def sbatch(*args) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
        if out.returncode:
            raise errors.InputError(f"sbatch {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout.strip().split(";")[0]

    array_id = sbatch(array_script)
    return array_id, sbatch(f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes", merge_script)
