"""Push DVC's run cache *and every output its entries name* to a DVC remote, so that another
machine's ``dvc repro --pull`` restores those runs instead of training again.

Why not just ``dvc push --run-cache``: on DVC 3.67 it sends the run-cache entries
(``.dvc/cache/runs``) plus the outputs that the workspace's dvc.lock names, not the outputs of the
other runs, and never the ``cache: false`` metrics (``reports/<role>/metrics.json``, ``timing.json``),
although a run-cache entry names them and DVC keeps them in the local cache for it (treeverse/dvc
#3778). ``dvc repro --pull`` on the other machine finds the entry, cannot fetch those objects
(``dvc/stage/cache.py``, ``StageCache.restore``: ``outs_cached()`` is false) and trains the stage
again. This pushes the objects of every run-cache entry in the local cache, metrics included.

    python scripts/push_run_cache.py [-r REMOTE]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def run_cache_entries(runs: Path) -> list[tuple[str, str]]:
    """(key, value) of every entry under ``.dvc/cache/runs/<xx>/<key>/<value>``."""
    if not runs.is_dir():
        return []
    return sorted((entry.parent.name, entry.name) for entry in runs.glob("*/*/*") if entry.is_file())


def push_run_cache(root: str | os.PathLike = ".", remote: str | None = None) -> tuple[int, int]:
    """Push the run cache of the DVC project at ``root`` and the objects its entries name to
    ``remote`` (the default remote when None). Returns (entries, objects transferred)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        entries = run_cache_entries(Path(repo.stage_cache.cache_dir))
        repo.stage_cache.push(remote)
        transferred = 0
        objects = set().union(*repo.stage_cache.get_used_objs(entries).values()) if entries else set()
        if objects:
            # the local cache is the source; DataCloud.push splits DVC 2 (md5-dos2unix) from DVC 3 objects
            result = repo.cloud.push(objects, remote=remote)
            if result.failed:
                raise SystemExit(f"push_run_cache: {len(result.failed)} object(s) failed to upload to remote "
                                 f"{remote or '(default)'}: the local cache lacks them (`dvc gc` removed them?)")
            transferred = len(result.transferred)
    return len(entries), transferred


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-r", "--remote", help="DVC remote name (default: the project's default remote)")
    args = parser.parse_args(argv)
    entries, transferred = push_run_cache(".", args.remote)
    print(f"push_run_cache: {entries} run-cache entries, {transferred} object(s) uploaded "
          f"to {args.remote or 'the default remote'}")


if __name__ == "__main__":
    sys.exit(main())
