"""`kimi sync`: each machine gets the checkpoint files its workers' planned
layers are in, and the small files (config, tokenizer), nothing more.

Which files: the plan (kimi plan) and the safetensors index. Copies stream
over ssh into `<file>.partial` and are renamed once their size is right, so an
interrupted sync goes on where it stopped; a file already there with the right
size is not copied again. After copying, every size is checked again.

From the Hugging Face hub (a repo id instead of a folder), the plan is sized
from the repo's safetensors headers (read remotely, no weights fetched) and
each machine downloads only its files with huggingface_hub's allow_patterns.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import posixpath
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import click

from .checkpoint import (
    DTYPE_BYTES,
    HEADERS_FILE,
    CheckpointError,
    TensorInfo,
    headers_json,
    read_config,
    stage_tensor_names,
    tensor_index,
    text_config,
)
from .cluster import Daemon
from .config import Config
from .plan import Plan, make_plan
from .remote import Machine, RemoteError, sh_path
from .sizes import LayerSizes, layer_sizes, sizes_from_tensors

CHUNK_BYTES = 4 << 20
PARTIAL = ".partial"
WEIGHT_SUFFIX = ".safetensors"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_DOWNLOAD_TIMEOUT_S = 24 * 3600.0


@dataclass
class Checkpoint:
    """What the plan and the copy need to know of the source checkpoint."""

    sizes: dict[str, int]  # file name -> bytes (every file copied, weights and small)
    weights_of: Callable[[int, int, bool, bool], set[str]]  # stage -> its weight files
    layer_sizes: LayerSizes
    model_config: dict
    made: dict[str, bytes] = field(default_factory=dict)  # files written here, not copied (HEADERS_FILE)
    # A source file's bytes from an offset on: (name, offset) -> a context giving a binary stream.
    open_at: Callable[[str, int], AbstractContextManager[BinaryIO]] | None = None


@dataclass
class Destination:
    machine: Machine
    model_dir: str  # as the machine's shell sees it
    python: str = "python3"  # the Python of kimizmq's environment there (hub downloads)
    daemons: list[str] = field(default_factory=list)
    files: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        return f"{self.machine.label}:{self.model_dir}"


# -- the source -------------------------------------------------------------------


def local_checkpoint(source: Path) -> Checkpoint:
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a folder")
    index = tensor_index(source)

    def weights_of(start: int, end: int, first: bool, last: bool) -> set[str]:
        return {index[n].file.name for n in stage_tensor_names(index, start, end, first=first, last=last)}

    sizes = {p.name: p.stat().st_size for p in sorted(source.iterdir()) if p.is_file()}
    made = {HEADERS_FILE: headers_json(index)}
    sizes.update({name: len(data) for name, data in made.items()})

    @contextlib.contextmanager
    def open_at(name: str, offset: int) -> Iterator[BinaryIO]:
        with open(source / name, "rb") as f:
            f.seek(offset)
            yield f

    return Checkpoint(sizes, weights_of, layer_sizes(source), read_config(source), made, open_at)


# Run on the machine holding the model, with its kimizmq: the file sizes and every header.
_REMOTE_INDEX = (
    "import json, sys; from pathlib import Path; "
    "from kimizmq.checkpoint import headers_json, read_config, tensor_index; "
    "d = Path(sys.argv[1]).expanduser(); "
    "print(json.dumps({'sizes': {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()}, "
    "'config': read_config(d), 'headers': headers_json(tensor_index(d)).decode()}))"
)


def remote_checkpoint(machine: Machine, python: str, model_dir: str) -> Checkpoint:
    """A checkpoint on another machine of the cluster, indexed there (headers only)."""
    proc = machine.run(
        f"{python} -c {shlex.quote(_REMOTE_INDEX)} {shlex.quote(model_dir)}", what=f"reading the checkpoint {model_dir}"
    )
    try:
        data = json.loads(proc.stdout)
        headers = json.loads(data["headers"])
        index = {
            n: TensorInfo(Path(file), d, tuple(shape), nb)
            for file, ts in headers.items()
            for n, (d, shape, nb) in ts.items()
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RemoteError(f"{machine.label}: reading the checkpoint {model_dir} gave no index: {e}") from None

    def weights_of(start: int, end: int, first: bool, last: bool) -> set[str]:
        return {index[n].file.name for n in stage_tensor_names(index, start, end, first=first, last=last)}

    made = {HEADERS_FILE: data["headers"].encode()}
    sizes = {**data["sizes"], **{name: len(b) for name, b in made.items()}}
    nbytes = {n: t.nbytes for n, t in index.items()}
    layers = sizes_from_tensors(nbytes, text_config(data["config"])["num_hidden_layers"])

    @contextlib.contextmanager
    def open_at(name: str, offset: int) -> Iterator[BinaryIO]:
        path = sh_path(posixpath.join(model_dir, name))
        reader = subprocess.Popen(machine.argv(f"tail -c +{offset + 1} {path}"), stdout=subprocess.PIPE)
        try:
            yield reader.stdout
        finally:
            reader.stdout.close()
            reader.wait()

    return Checkpoint(sizes, weights_of, layers, data["config"], made, open_at)


def hub_checkpoint(repo_id: str, revision: str | None) -> Checkpoint:
    """A checkpoint on the Hugging Face hub, from its file list and safetensors
    headers (ranged reads): no weight is fetched."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise click.ClickException(
            "a repo id as SOURCE needs huggingface_hub: pip install huggingface_hub (or give a folder)"
        ) from None
    api = HfApi()
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or [] if "/" not in s.rfilename}
    meta = api.get_safetensors_metadata(repo_id, revision=revision)
    where: dict[str, str] = {}
    nbytes: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file, fm in meta.files_metadata.items():
        for name, t in fm.tensors.items():
            if t.dtype not in DTYPE_BYTES:
                raise CheckpointError(f"{repo_id}/{file}: tensor {name} has unknown dtype {t.dtype}")
            where[name] = file
            dtypes[name], shapes[name] = t.dtype, tuple(t.shape)
            nbytes[name] = math.prod(t.shape) * DTYPE_BYTES[t.dtype]
    model_config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
    index = {name: TensorInfo(Path(where[name]), dtypes[name], shapes[name], nbytes[name]) for name in where}

    def weights_of(start: int, end: int, first: bool, last: bool) -> set[str]:
        return {index[n].file.name for n in stage_tensor_names(index, start, end, first=first, last=last)}

    made = {HEADERS_FILE: headers_json(index)}
    sizes.update({name: len(data) for name, data in made.items()})
    layers = sizes_from_tensors(nbytes, text_config(model_config)["num_hidden_layers"])
    return Checkpoint(sizes, weights_of, layers, model_config, made)


# -- the plan of files ------------------------------------------------------------


def small_files(ck: Checkpoint) -> set[str]:
    """Everything but the weights: config, tokenizer, index, chat template."""
    return {f for f in ck.sizes if not f.endswith(WEIGHT_SUFFIX)}


def worker_files(cfg: Config, ck: Checkpoint) -> tuple[Plan, dict[str, set[str]]]:
    """The plan, and the files each worker needs (its weight files and the small files)."""
    plan = make_plan(cfg, ck.layer_sizes, model_config=ck.model_config)
    n = plan.num_layers
    return plan, {
        s.worker: ck.weights_of(s.start, s.end, s.start == 0, s.end == n) | small_files(ck) for s in plan.stages
    }


def remote_model_dir(raw: str, remote_config: str) -> str:
    """[model] path as the daemon's machine resolves it: against its config's folder."""
    if raw.startswith("~") or posixpath.isabs(raw):
        return raw
    return posixpath.normpath(posixpath.join(posixpath.dirname(remote_config), raw))


def python_of(d: Daemon) -> str:
    """sh: the Python of the daemon's environment there (beside its program), with its env."""
    program = d.program
    python = sh_path(posixpath.join(posixpath.dirname(program), "python")) if "/" in program else "python3"
    return f"{d.env_prefix()}{python}"


def source_daemon(cfg: Config, source: str) -> Daemon | None:
    """The daemon whose machine holds SOURCE = NAME:FOLDER, or None for a local folder."""
    from .cluster import daemons

    name, sep, folder = source.partition(":")
    if not sep or not folder or os.path.exists(source):
        return None
    for d in daemons(cfg):
        if d.name == name:
            return d
    known = ", ".join(d.name for d in daemons(cfg))
    raise RemoteError(f"{source}: no worker or coordinator named {name!r} to copy from (known: {known})")


def destinations(cfg: Config, files: dict[str, set[str]], ck: Checkpoint) -> list[Destination]:
    """One per (machine, model folder), with every file its daemons need."""
    from .cluster import daemons, raw_model_path

    raw = raw_model_path(cfg)
    out: dict[tuple, Destination] = {}
    for d in daemons(cfg):
        model_dir = remote_model_dir(raw, d.config)
        key = (d.ssh.target if d.ssh else None, d.ssh.port if d.ssh else 0, model_dir)
        dest = out.setdefault(key, Destination(d.machine, model_dir, python_of(d)))
        dest.daemons.append(d.name)
        dest.files |= files.get(d.name, small_files(ck))  # the coordinator: config and tokenizer
    return list(out.values())


def describe_files(files: set[str], sizes: dict[str, int]) -> str:
    weights = sorted(f for f in files if f.endswith(WEIGHT_SUFFIX))
    total = sum(sizes.get(f, 0) for f in files)
    size = f"{total / 2**30:.2f} GiB" if total >= 2**30 else f"{total / 2**20:.2f} MiB"
    return f"{len(files)} files, {size} ({len(weights)} weight files: {', '.join(weights) or '-'})"


# -- copying ----------------------------------------------------------------------


def remote_sizes(dest: Destination, names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (size of the file, size of its .partial), -1 where missing."""
    quoted = " ".join(shlex.quote(n) for n in names)
    script = (
        f"mkdir -p {sh_path(dest.model_dir)} && cd {sh_path(dest.model_dir)} && for f in {quoted}; do "
        's=-1; [ -f "$f" ] && s=$(wc -c < "$f"); '
        f'p=-1; [ -f "$f{PARTIAL}" ] && p=$(wc -c < "$f{PARTIAL}"); echo $s $p; done'
    )
    out = dest.machine.run(script, what=f"listing {dest.model_dir}").stdout.decode().split("\n")
    rows = [line.split() for line in out if line.strip()]
    if len(rows) != len(names):
        raise RemoteError(f"{dest.label}: listing gave {len(rows)} lines for {len(names)} files")
    return {n: (int(r[0]), int(r[1])) for n, r in zip(names, rows)}


def copy_file(
    dest: Destination, source: BinaryIO, name: str, size: int, offset: int, advance: Callable[[int], None]
) -> None:
    """Append `source` (the file from `offset` on) to `name.partial` there; rename it once its size is `size`."""
    part = shlex.quote(name + PARTIAL)
    script = (
        f"cd {sh_path(dest.model_dir)} && cat {'>>' if offset else '>'} {part} && "
        f"[ $(wc -c < {part}) -eq {size} ] && mv -f {part} {shlex.quote(name)}"
    )
    proc = dest.machine.popen(script)
    try:
        while chunk := source.read(CHUNK_BYTES):
            proc.stdin.write(chunk)
            advance(len(chunk))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    finally:
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.wait()
    if proc.returncode != 0:
        raise RemoteError(f"{dest.label}: copying {name} failed (exit {proc.returncode}): {err or 'size differs'}")


def sync_files(
    dests: list[Destination], ck: Checkpoint, echo: Callable[[str], None], progress: bool = True
) -> dict[str, int]:
    """Copy what each destination lacks; bytes copied per destination."""
    sizes = ck.sizes
    copied = {}
    for dest in dests:
        names = sorted(dest.files)
        have = remote_sizes(dest, names)
        todo = []
        for n in names:
            size, partial = have[n]
            if size == sizes[n]:
                continue
            todo.append((n, partial if 0 <= partial <= sizes[n] else 0))
        total = sum(sizes[n] - off for n, off in todo)
        if not todo:
            echo(f"{dest.label}: all {len(names)} files there ({', '.join(dest.daemons)})")
            copied[dest.label] = 0
            continue
        resumed = sum(1 for _, off in todo if off)
        echo(
            f"{dest.label}: copying {len(todo)} of {len(names)} files, {total / 2**20:.1f} MiB"
            + (f" ({resumed} resumed)" if resumed else "")
            + f" for {', '.join(dest.daemons)}"
        )
        with click.progressbar(length=total, label=dest.machine.label, hidden=not progress) as bar:
            for n, off in todo:
                with io.BytesIO(ck.made[n][off:]) if n in ck.made else ck.open_at(n, off) as f:
                    copy_file(dest, f, n, sizes[n], off, bar.update)
        verify(dest, names, sizes)
        copied[dest.label] = total
    return copied


def verify(dest: Destination, names: list[str], sizes: dict[str, int]) -> None:
    wrong = [f"{n} ({s} bytes, want {sizes[n]})" for n, (s, _) in remote_sizes(dest, names).items() if s != sizes[n]]
    if wrong:
        raise RemoteError(f"{dest.label}: sizes differ after the copy: {', '.join(wrong)}")


def sync_hub(
    dests: list[Destination], repo_id: str, revision: str | None, made: dict[str, bytes], echo: Callable[[str], None]
) -> None:
    """Each machine downloads its own files from the hub (huggingface_hub there)."""
    for dest in dests:
        patterns = sorted(dest.files - set(made))
        code = (
            "import sys, json; from huggingface_hub import snapshot_download; "
            "snapshot_download(sys.argv[1], revision=sys.argv[2] or None, "
            "allow_patterns=json.loads(sys.argv[3]), local_dir=sys.argv[4])"
        )
        script = (
            f"{dest.python} -c {shlex.quote(code)} {shlex.quote(repo_id)} {shlex.quote(revision or '')} "
            f"{shlex.quote(json.dumps(patterns))} {sh_path(dest.model_dir)}"
        )
        echo(f"{dest.label}: downloading {len(patterns)} files of {repo_id} for {', '.join(dest.daemons)}")
        dest.machine.run(script, what=f"downloading from the hub into {dest.model_dir}", timeout=HUB_DOWNLOAD_TIMEOUT_S)
        for name, data in made.items():
            path = sh_path(posixpath.join(dest.model_dir, name))
            dest.machine.run(f"cat > {path}", what=f"writing {name}", input=data)


def is_repo_id(source: str) -> bool:
    return not os.path.exists(source) and REPO_ID.match(source) is not None
