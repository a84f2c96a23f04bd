"""``python -m bench run [--quick] [--out FILE]`` · ``python -m bench compare A.json B.json``
· ``python -m bench profile SCENARIO`` · ``python -m bench walmap SCENARIO`` (see
bench/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("bid", "bidfull", "e2e", "fanout", "store", "memory", "recovery")


def _commit(rev: str) -> str:
    repo = Path(__file__).resolve().parent.parent
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not found:
        sys.exit(f"--rev {rev}: not a commit")
    return found


def _archive(rev: str, into: Path) -> Path:
    """``worker/`` and ``schemas/`` as committed at ``rev`` (``git archive``: read-only)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        tar = subprocess.run(
            ["git", "archive", "--format=tar", f"{rev}^{{commit}}", "worker", "schemas"],
            cwd=repo,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit(f"--rev {rev}: {exc.stderr.decode(errors='replace').strip()}")
    source = into / "archive"
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(source, filter="data")
    return source


def _snapshot(tree: str, into: Path) -> tuple[str, str]:
    """Copy ``worker/`` and ``schemas/`` of ``tree`` (default: this checkout) into ``into``
    and measure that copy: other engineers may change the tree while a run goes on, and
    every node of one run must run the same code. The copy goes first on sys.path here
    and on PYTHONPATH of every node process. Returns (copy, content hash)."""
    source = Path(tree).resolve() if tree else Path(__file__).resolve().parent.parent
    if not (source / "worker" / "node.py").is_file():
        sys.exit(f"--worker-tree {tree}: no worker/node.py there")
    digest = hashlib.sha256()
    for package in ("worker", "schemas"):
        shutil.copytree(
            source / package, into / package, ignore=shutil.ignore_patterns("__pycache__")
        )
        for f in sorted((into / package).rglob("*")):
            if f.is_file():
                digest.update(str(f.relative_to(into)).encode() + b"\0" + f.read_bytes())
    sys.path.insert(0, str(into))
    return str(into), digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="measure everything, print the table, write JSON")
    run.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    run.add_argument("--out", type=Path, help="JSON file (default bench/results/<time>.json)")
    run.add_argument("--only", default="", help=f"comma-separated groups of {','.join(GROUPS)}")
    run.add_argument("--worker-tree", default="", help="source tree of the node to measure")
    run.add_argument("--rev", default="", help="measure worker/ as committed at this git rev")
    run.add_argument(
        "--no-settle",
        action="store_true",
        help="do not hold e2e back after a recent run's clean-up (ext4 without a journal)",
    )

    cmp = sub.add_parser("compare", help="compare two result files (before/after)")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    cmp.add_argument("--threshold", type=float, default=0.10, help="flag changes ≥ this")

    rep = sub.add_parser("report", help="print a result file's table again (recomputed)")
    rep.add_argument("file", type=Path)
    rep.add_argument("--write", action="store_true", help="store the recomputed figures")

    prof = sub.add_parser("profile", help="py-spy a node under one load")
    prof.add_argument("scenario", choices=("ask", "seq", "e2e", "fanout"))
    prof.add_argument("--seconds", type=float, default=20)
    prof.add_argument("--out", type=Path, help="output prefix (default bench/results/profile-…)")
    prof.add_argument("--worker-tree", default="")
    prof.add_argument("--rev", default="")
    prof.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    prof.add_argument(
        "--native", action="store_true", help="also sample with Linux perf: time per binary"
    )

    wal = sub.add_parser("walmap", help="which tables and indexes a node's commits write")
    wal.add_argument("scenario", choices=("ask", "e2e"))
    wal.add_argument("--ops", type=int, default=3000, help="operations measured")
    wal.add_argument("--warmup", type=int, default=5000, help="operations before them")
    wal.add_argument("--out", type=Path, help="output file (default bench/results/walmap-…)")
    wal.add_argument("--worker-tree", default="")
    wal.add_argument("--rev", default="")

    args = parser.parse_args(argv)
    if args.command == "compare":
        from bench.report import compare

        print(compare(args.a, args.b, args.threshold))
        return 0
    if args.command == "report":
        from bench.report import rerender

        print(rerender(args.file, write_back=args.write))
        return 0
    only = {g.strip() for g in getattr(args, "only", "").split(",") if g.strip()} or None
    if only and not only <= set(GROUPS):
        parser.error(f"--only: unknown group(s) {sorted(only - set(GROUPS))}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="bench-src-") as copy:
        source = args.worker_tree
        if args.rev:
            args.rev = _commit(args.rev)  # HEAD moves while a run goes on: pin it now
            source = str(_archive(args.rev, Path(copy)))
        tree, code_hash = _snapshot(source, Path(copy) / "src")
        if args.command == "profile":
            from bench.profile import profile

            out = args.out or RESULTS / f"profile-{args.scenario}-{stamp}"
            return asyncio.run(
                profile(
                    args.scenario,
                    seconds=args.seconds,
                    out=out,
                    tree=tree,
                    gil=args.gil,
                    native=args.native,
                )
            )
        if args.command == "walmap":
            from bench.walmap import walmap

            out = args.out or RESULTS / f"walmap-{args.scenario}-{stamp}.txt"
            return asyncio.run(
                walmap(args.scenario, ops=args.ops, warmup=args.warmup, tree=tree, out=out)
            )
        from bench.run import main as run_main

        out = args.out or RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
        source = f"git:{args.rev}" if args.rev else args.worker_tree
        return asyncio.run(
            run_main(
                quick=args.quick,
                out=out,
                only=only,
                tree=tree,
                source=source,
                code_hash=code_hash,
                settle=not args.no_settle,
            )
        )


if __name__ == "__main__":
    sys.exit(main())
