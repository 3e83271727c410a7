"""``loraforge cache``: list the quantized bases kept in the model cache, and remove them."""

from __future__ import annotations

import argparse
import time

GIB = 1 << 30


def add_cache_parser(commands) -> None:
    cache = commands.add_parser("cache", help="list or remove the quantized bases kept in $LORAFORGE_CACHE/quantized")
    cache.add_argument("--remove", nargs="+", metavar="NAME", default=[],
                       help="remove these entries (names as listed)")
    cache.add_argument("--max-gib", type=float, metavar="GIB",
                       help="remove entries, least recently used first, until the cache holds at most GIB GiB")
    cache.set_defaults(handler=run_cache)


def run_cache(args: argparse.Namespace) -> int:
    from loraforge.cli.main import CommandError
    from loraforge.models.quantized_base import cache_folder, cached_bases, evict_least_recent, remove_cached

    entries = {entry.path.name: entry for entry in cached_bases()}
    unknown = [name for name in args.remove if name not in entries]
    if unknown:
        raise CommandError(f"--remove {' '.join(unknown)}: no such cache entry in {cache_folder()}; "
                           f"the entries are: {', '.join(entries) or '(none)'}")
    if args.max_gib is not None and args.max_gib < 0:
        raise CommandError(f"--max-gib {args.max_gib}: give a size of 0 or more GiB")
    for name in args.remove:
        remove_cached(entries[name])
        print(f"removed {name} ({entries[name].nbytes / GIB:.2f} GiB)")
    if args.max_gib is not None:
        for entry in evict_least_recent(int(args.max_gib * GIB)):
            print(f"removed {entry.path.name} ({entry.nbytes / GIB:.2f} GiB, last used {_when(entry.last_used)})")
    _list()
    return 0


def _list() -> None:
    from loraforge.models.quantized_base import cache_folder, cached_bases

    entries = cached_bases()
    print(f"{cache_folder()}: {len(entries)} quantized base(s), {sum(e.nbytes for e in entries) / GIB:.2f} GiB")
    for entry in entries:
        print(f"  {entry.path.name}  {entry.nbytes / GIB:.2f} GiB  last used {_when(entry.last_used)}\n"
              f"    source: {entry.source}\n    quantization: {entry.quantization}")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))
