"""Secrets of the environment never leave the process: what a run writes or prints is redacted.

A secret is the value of an environment variable whose name says it is one (``WANDB_API_KEY``, ``HF_TOKEN``,
``AWS_SECRET_ACCESS_KEY``, ``GITHUB_TOKEN``, ``*_PASSWORD``, ...). Such a value can still reach a run's text
by another way than the environment: a shell expands ``$HF_TOKEN`` in an override
(``data.train_shards='pipe:curl -H "Authorization: Bearer $HF_TOKEN" ...'``), and from there it would go into
the recipe recorded in every manifest, the W&B config and command line, a Slurm log or an error message.
Every such sink passes its text through ``redact``, which writes the variable's name (``$HF_TOKEN``) in place
of its value, so the recorded recipe still says where the value comes from.
"""
from __future__ import annotations

import os
import re

# names of variables that hold credentials; short values (< 8 characters) are never treated as secrets
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH)",
                         re.IGNORECASE)
MIN_LENGTH = 8


def secrets() -> dict[str, str]:
    """value -> variable name, longest values first (a value containing another is replaced whole)."""
    found = {v: k for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_LENGTH}
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def redact(obj, _found: dict[str, str] | None = None):
    """``obj`` (a string, or JSON-like containers of them) with every secret value replaced by ``$NAME``."""
    found = secrets() if _found is None else _found
    if not found:
        return obj
    if isinstance(obj, str):
        for value, name in found.items():
            if value in obj:
                obj = obj.replace(value, f"${name}")
        return obj
    if isinstance(obj, dict):
        return {redact(k, found): redact(v, found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, found) for v in obj)
    return obj
