"""`fmdefense data fetch|info`: download the offline sources, inspect a dataset."""

from __future__ import annotations

import argparse
import json

import numpy as np

from fmdefense.cli.common import DATASETS, add_common


def fetch_command(args: argparse.Namespace) -> None:
    """Fetch each dataset's source and build its cache; one line per dataset."""
    from fmdefense.data import fetch, load_raw

    for name in args.dataset:
        fetch(name)
        ds = load_raw(name, data_dir=args.data_dir)
        print(f"{name}: {len(ds.y_train)} train / {len(ds.y_test)} test images ready")


def info_command(args: argparse.Namespace) -> None:
    """Counts, shapes, label histograms and the cache's checksum, as JSON."""
    from fmdefense.core.artifacts import read_json
    from fmdefense.core.paths import data_home
    from fmdefense.data import load_raw
    from fmdefense.data.sources import cache_key, cache_paths

    ds = load_raw(args.dataset, data_dir=args.data_dir)
    _, record = cache_paths(cache_key(args.dataset, args.data_dir), data_home())
    info = {
        "dataset": ds.name,
        "train": len(ds.y_train),
        "test": len(ds.y_test),
        "image_shape": list(ds.image_shape),
        "classes": ds.num_classes,
        "train_label_counts": np.bincount(ds.y_train).tolist(),
        "test_label_counts": np.bincount(ds.y_test).tolist(),
        "sha256": read_json(record)["sha256"] if record.is_file() else None,
    }
    print(json.dumps(info, indent=2))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data fetch` and `data info`."""
    data = sub.add_parser("data", help="fetch and inspect datasets").add_subparsers(
        dest="action", required=True
    )
    p = data.add_parser("fetch", help="download the offline sources and build the caches")
    p.add_argument("--dataset", nargs="+", choices=DATASETS, default=["mnist"])
    add_common(p, device=False)
    p.set_defaults(func=fetch_command)
    p = data.add_parser("info", help="counts, shapes, label histogram and checksum")
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    add_common(p, device=False)
    p.set_defaults(func=info_command)
