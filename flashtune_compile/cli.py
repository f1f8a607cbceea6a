"""The ``flashtune`` console script: inspect, move and plot the tactic cache.

    flashtune [--cache-dir DIR] cache show [--file FILE] [--op OP]
    flashtune [--cache-dir DIR] cache export FILE | import FILE | merge OUT IN [IN ...] | clear [--all]
    flashtune [--cache-dir DIR] report --png FILE [--file DOC]
    flashtune build [--kernels cpu,cuda]

Every command returns 0 on success. A user error (a missing or foreign file, an unwritable path)
prints ``flashtune: error: <message>`` to stderr and returns 1, never a traceback; a malformed
command line keeps argparse's exit status 2. Nothing here writes a cache document except through
``write_document`` (an atomic replace) or the tuner's own cache.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__, artifacts
from .tuner.autotuner import AutoTuner
from .tuner.cache import CacheFileError, Entry, Key, env_diff, merge, parse_document, read_json, write_document

REPORT_EXTRA = "flashtune report needs matplotlib: pip install 'flashtune_compile[report]'"


class UserError(Exception):
    """A problem the user can fix; ``main`` prints it as one line and returns 1."""


# -- reading and formatting documents ------------------------------------------------------------


def _documents(directory: Path | None) -> list[Path]:
    """Every tactic document in ``directory``, sorted by name (none if it does not exist)."""
    if directory is None:
        raise UserError("the tactic cache is in memory only (no cache directory); pass --cache-dir")
    return sorted(directory.glob("tactics-*.json")) if directory.is_dir() else []


def _read(path: Path) -> tuple[dict[str, Any], dict[Key, Entry]]:
    """(environment, entries) of any valid document, whatever its environment; CacheFileError if
    it is not one."""
    doc = read_json(path)
    entries = parse_document(doc, str(path), None)
    return (doc["env"] if isinstance(doc.get("env"), dict) else {}), entries


def _env_text(env: dict[str, Any]) -> str:
    """The fields of an environment a user tells machines apart by, on one line."""
    device = f"gpu {env['gpu']}" if env.get("gpu") else f"cpu {env.get('cpu')}"
    return f"torch {env.get('torch')}, triton {env.get('triton')}, cuda {env.get('cuda') or 'none'}, {device}"


def _is_tensor(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 4 and item[0] == "T"


def _shapes(static: tuple) -> str:
    """Tensor shapes as ``[*,256] [512,256] [512]`` (a dynamic dim is ``*``); other inputs by value."""
    parts = []
    for item in static:
        if _is_tensor(item):
            parts.append("[" + ",".join("*" if d == -1 else str(d) for d in item[1]) + "]")
        elif item is not None:
            parts.append(str(item))
    return " ".join(parts)


def _dtypes(static: tuple) -> str:
    """The distinct tensor dtypes, in input order."""
    return ",".join(dict.fromkeys(item[2] for item in static if _is_tensor(item)))


def _bucket(bucket: tuple[int, ...]) -> str:
    return ",".join(map(str, bucket)) if bucket else "static"


def _tactic(tactic: Any) -> str:
    return "default" if tactic == -1 else str(tactic)


def _sort_key(key: Key) -> tuple:
    """Order by op, then static key (tensor shapes numerically), then bucket."""
    op, _, static, _, bucket = key
    static_key = tuple((0, item[1], item[2]) if _is_tensor(item) else (1, repr(item)) for item in static)
    return op, static_key, bucket


def _table(title: str, entries: dict[Key, Entry]) -> Table:
    """One row per entry, sorted by op, static shapes and bucket."""
    # As wide as the title, so a long path is not broken across lines (where the console allows).
    table = Table(title=title, title_justify="left", min_width=max(map(len, title.splitlines())))
    for name in ("op", "static shapes", "dtype", "bucket", "kernel", "tactic", "time µs", "speedup"):
        table.add_column(name, justify="right" if name in ("time µs", "speedup") else "left")
    for key in sorted(entries, key=_sort_key):
        e = entries[key]
        timed = e.time_s > 0  # a bucket with a single candidate is recorded untimed
        table.add_row(
            key[0],
            _shapes(key[2]),
            _dtypes(key[2]),
            _bucket(key[4]),
            e.runner,
            _tactic(e.tactic),
            f"{e.time_s * 1e6:.1f}" if timed else "untimed",
            f"{e.speedup:.2f}x" if timed else "-",
        )
    return table


# -- commands ------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, out: Console) -> int:
    """Print one table per document; 1 if any document was unreadable (the others still shown)."""
    cache = args.cache
    paths = [Path(args.file)] if args.file else _documents(cache.directory)
    if not paths:
        out.print(f"no tactic cache documents in {cache.directory}")
        return 0
    status = 0
    for path in paths:
        try:
            env, entries = _read(path)
        except (CacheFileError, OSError) as e:
            _error(str(e))
            status = 1
            continue
        mine = " (this environment)" if env == cache.env else ""
        entries = {k: e for k, e in entries.items() if args.op in (None, k[0])}
        if entries:
            out.print(_table(f"{path}\n{_env_text(env)}{mine}", entries))
        else:
            out.print(f"{path}: no entries{f' for op {args.op!r}' if args.op else ''}{mine}")
    return status


def cmd_export(args: argparse.Namespace, out: Console) -> int:
    """Write this environment's entries to one document at ``args.file``."""
    n = args.cache.save(args.file)
    out.print(f"exported {n} entries to {args.file}")
    return 0


def cmd_import(args: argparse.Namespace, out: Console) -> int:
    """Merge a tactic document or an artifact file (same environment only) into this cache; an
    artifact's Inductor artifacts and kernel libraries go into Inductor's on-disk caches too."""
    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if artifacts.is_artifact(path):
        loaded = artifacts.load_artifacts(path)
        out.print(
            f"imported {loaded['tactics']} tactic entries, {loaded['inductor']} Inductor artifacts and "
            f"{loaded['libraries']} kernel libraries from {path}"
        )
    else:
        n = args.cache.load(path)
        out.print(f"imported {n} entries from {path} into {args.cache.path}")
    return 0


def cmd_merge(args: argparse.Namespace, out: Console) -> int:
    """Merge documents of one environment into ``args.out`` (newer ``created`` wins on a shared key);
    nothing is written if any input is unreadable or from another environment."""
    target = Path(args.out)
    sources = ([target] if target.exists() else []) + [Path(p) for p in args.inputs]
    env: dict[str, Any] | None = None
    merged: dict[Key, Entry] = {}
    for path in sources:
        their_env, entries = _read(path)
        if env is None:
            env, first = their_env, path
        elif their_env != env:
            raise UserError(
                f"{path}: made under another environment than {first}; differs in "
                f"({path} vs {first}): "
                + "; ".join(f"{k}: {a} vs {b}" for k, (a, b) in env_diff(their_env, env).items())
            )
        merge(merged, entries)
        out.print(f"{path}: {len(entries)} entries")
    assert env is not None
    write_document(target, env, merged)
    out.print(f"wrote {len(merged)} entries from {len(sources)} documents to {target}")
    return 0


def cmd_clear(args: argparse.Namespace, out: Console) -> int:
    """Delete this environment's document, or with ``--all`` every document (and lock) in the dir."""
    cache = args.cache
    paths = _documents(cache.directory) if args.all else [p for p in [cache.path] if p and p.exists()]
    cache.clear(disk=True)
    for path in paths:
        path.unlink(missing_ok=True)
        Path(f"{path}.lock").unlink(missing_ok=True)
        out.print(f"removed {path}")
    if args.all:  # clear() may have left this environment's lock file behind
        for lock in cache.directory.glob("tactics-*.json.lock"):
            lock.unlink(missing_ok=True)
    if not paths:
        which = "tactic cache documents" if args.all else "tactic cache for this environment"
        out.print(f"nothing to remove: no {which} in {cache.directory}")
    return 0


def cmd_report(args: argparse.Namespace, out: Console) -> int:
    """Draw speedup over default against bucket, one subplot per op, into one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(REPORT_EXTRA) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    path = Path(args.file) if args.file else args.cache.path
    if path is None or not path.exists():
        raise UserError(f"no tactic cache to plot: {path} does not exist")
    env, entries = _read(path)
    bucketed = {k: e for k, e in entries.items() if k[4]}
    skipped = len(entries) - len(bucketed)
    if not bucketed:
        raise UserError(f"no bucketed entries to plot in {path} ({skipped} static-shape entries)")
    ops = sorted({k[0] for k in bucketed})
    kernels = sorted({e.runner for e in bucketed.values()})
    colour = {k: f"C{i % 10}" for i, k in enumerate(kernels)}
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, 1.5 + 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        lines: dict[tuple, list[tuple[int, Entry]]] = {}
        for (k_op, _, static, extras, bucket), e in bucketed.items():
            if k_op == op:  # x is the first dynamic size; a line per static shape (and further sizes)
                lines.setdefault((static, extras, bucket[1:]), []).append((bucket[0], e))
        for points in lines.values():
            points.sort(key=lambda p: p[0])
            xs, ys = [p[0] for p in points], [p[1].speedup for p in points]
            ax.plot(xs, ys, color="0.7", linewidth=0.8, zorder=1)
            ax.scatter(xs, ys, c=[colour[p[1].runner] for p in points], s=28, zorder=2)
        ax.axhline(1.0, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ticks = sorted({x for points in lines.values() for x, _ in points})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"{op} ({len(lines)} static shapes)")
        ax.set_xlabel("bucket")
        ax.set_ylabel("speedup over default")
    handles = [Line2D([], [], marker="o", linestyle="", color=colour[k], label=k) for k in kernels]
    fig.legend(handles=handles, title="kernel", loc="upper right")
    fig.suptitle(f"{path.name}: {_env_text(env)}", fontsize=9, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 0.82, 0.97))
    try:
        fig.savefig(args.png, dpi=120)
    finally:
        plt.close(fig)
    out.print(f"wrote {args.png} ({len(bucketed)} entries, {len(ops)} ops); skipped {skipped} static-shape entries")
    return 0


# -- entry point ---------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace, out: Console) -> int:
    """Build every compiled kernel family this machine can use (``ft.prepare``); 1 if one failed."""
    from .api import prepare

    try:
        rows = prepare(args.kernels.split(",") if args.kernels else None)
    except ValueError as e:
        raise UserError(str(e)) from None
    table = Table(title="flashtune kernel builds")
    for column in ("family", "kernels", "status", "seconds", "detail"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for row in rows:
        table.add_row(row.family, row.what, row.status, f"{row.seconds:.1f}", row.detail)
    out.print(table)
    return 1 if any(row.status == "unavailable" for row in rows) else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashtune", description="Inspect and move flashtune's tactic cache; build its kernels ahead of time."
    )
    p.add_argument("--version", action="version", version=f"flashtune {__version__}")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="the cache directory (default: $FLASHTUNE_CACHE_DIR, else the user cache dir)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    cache = sub.add_parser("cache", help="show, export, import, merge or clear tactic documents")
    csub = cache.add_subparsers(dest="action", required=True)
    show = csub.add_parser("show", help="a table per document in the cache dir")
    show.add_argument("--file", help="show this one document instead (any environment)")
    show.add_argument("--op", help="only entries of this op")
    show.set_defaults(run=cmd_show)
    csub.add_parser("export", help="write this environment's entries to FILE").set_defaults(run=cmd_export)
    csub.add_parser("import", help="merge FILE (a tactic document or an artifact bundle) into the cache").set_defaults(
        run=cmd_import
    )
    for name in ("export", "import"):
        csub.choices[name].add_argument("file", metavar="FILE")
    mrg = csub.add_parser("merge", help="merge documents of one environment into OUT")
    mrg.add_argument("out", metavar="OUT")
    mrg.add_argument("inputs", metavar="IN", nargs="+")
    mrg.set_defaults(run=cmd_merge)
    clear = csub.add_parser("clear", help="delete this environment's document")
    clear.add_argument("--all", action="store_true", help="delete every document in the cache dir")
    clear.set_defaults(run=cmd_clear)
    report = sub.add_parser("report", help="plot speedup over default per bucket to a PNG")
    report.add_argument("--png", required=True, metavar="FILE")
    report.add_argument("--file", metavar="DOC", help="plot this document (default: this environment's)")
    report.set_defaults(run=cmd_report)
    build = sub.add_parser("build", help="build the compiled kernel families now (once per machine)")
    build.add_argument("--kernels", metavar="FAMILIES", help="comma-separated families (default: all)")
    build.set_defaults(run=cmd_build)
    return p


def _error(message: str) -> None:
    print(f"flashtune: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (0 ok, 1 user error, 2 bad command line)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse's own status
        return e.code if isinstance(e.code, int) else 1
    out = Console(markup=False, highlight=False)
    if not out.is_terminal:  # piped or captured: wide enough that a row stays one line
        out.width = max(out.width, 160)
    # With --cache-dir, the command runs against a tuner of its own for that directory.
    previous = AutoTuner.reset(AutoTuner(cache_dir=args.cache_dir)) if args.cache_dir else None
    try:
        args.cache = AutoTuner.get().cache
        return args.run(args, out)
    except (UserError, CacheFileError, OSError) as e:
        _error(str(e))
        return 1
    finally:
        if args.cache_dir:
            AutoTuner.reset(previous)
