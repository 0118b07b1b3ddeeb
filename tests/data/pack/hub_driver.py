"""Runs ``adadpo-pack`` on ``hf:`` inputs in a fresh process, for tests/unit/test_pack_hub.py.

A fresh process because ``datasets`` reads ``HF_HOME``/``HF_DATASETS_OFFLINE`` once, at
import: the test starts this with ``HF_HOME`` in its tmp directory and offline mode on
(no network), so nothing but what the test put there can be read.

    python hub_driver.py CASES.json RESULTS.json

CASES.json: ``{"cache": {...} | null, "runs": {name: [argv...]}}``. With ``cache``
(``{"name": "org/ds", "commit": SHA, "files": {split: path}}``), the dataset is first put
in the datasets cache as an online ``load_dataset("org/ds")`` leaves it: prepared Arrow
files under ``HF_DATASETS_CACHE/org___ds/default/0.0.0/SHA/``. RESULTS.json:
``{name: {"rc", "stderr"}}`` (adadpo-pack's own stderr lines).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def put_in_cache(name: str, commit: str, files: dict[str, str]) -> None:
    """Prepare ``files`` (JSONL per split) as the cached Hub dataset ``name`` at ``commit``."""
    from datasets import config
    from datasets.packaged_modules.json.json import Json

    namespace, short = name.split("/")
    builder = Json(dataset_name=short, hash=commit, config_name="default", config_id="default",
                   data_files={split: [path] for split, path in files.items()})
    builder.download_and_prepare()
    # A Hub dataset's cache folder carries the namespace: NAMESPACE___NAME.
    os.rename(os.path.join(config.HF_DATASETS_CACHE, short),
              os.path.join(config.HF_DATASETS_CACHE, f"{namespace}___{short}"))


def main() -> None:
    cases = json.loads(open(sys.argv[1], encoding="utf-8").read())
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1", "the driver runs offline only"
    if cases.get("cache"):
        put_in_cache(**cases["cache"])
    from adadpo_megatron.data import pack_tool

    results = {}
    for name, argv in cases["runs"].items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = pack_tool.main(argv)
        results[name] = {"rc": rc, "stderr": err.getvalue()}
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
