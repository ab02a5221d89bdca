"""`MetricsLog`: each member's metrics.jsonl (the source of truth), optionally mirrored to Weights & Biases.

wandb is never required: it is imported only when asked for, and a missing package is a one-line error. On resume,
lines past the checkpoint's step are dropped from the JSONL files (the resumed run writes them again), and the same
wandb run is continued (its id is kept in the run directory's wandb.json).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from sae_kit.atomic import write_bytes, write_json
from sae_kit.errors import SaeKitError


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the lines of `path` whose "step" is at most `last_step` (and drop a torn last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_bytes(path, "".join(kept).encode())


class MetricsLog:
    """Append metrics lines per member; mirror them to wandb as `<member>/<metric>` when `wandb_project` is set."""

    def __init__(
        self,
        run_dir: Path,
        files: dict[str, Path],
        resume_step: int | None,
        wandb_project: str | None,
        config: dict[str, Any],
    ) -> None:
        for path in files.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_jsonl(path, resume_step)
        self._files = {name: open(path, "a") for name, path in files.items()}
        self._wandb = _start_wandb(run_dir, wandb_project, config) if wandb_project else None

    @classmethod
    def disabled(cls) -> MetricsLog:
        """A log that writes nothing (the ranks other than 0 of a data-parallel run)."""
        log = cls.__new__(cls)
        log._files, log._wandb = {}, None
        return log

    def write(self, member: str, metrics: dict[str, float]) -> None:
        if member not in self._files:  # a disabled log
            return
        f = self._files[member]
        f.write(json.dumps(metrics) + "\n")
        f.flush()
        if self._wandb is not None:
            self._wandb.log({f"{member}/{k}": v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def summary(self, values: dict[str, Any]) -> None:
        """Record final (held-out) values in the wandb run summary."""
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, project: str, config: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        raise SaeKitError("--wandb needs the wandb package: pip install 'sae-kit[wandb]' (or drop --wandb)") from None
    id_file = run_dir / "wandb.json"
    run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else secrets.token_hex(6)
    write_json(id_file, {"id": run_id, "project": project})
    return wandb.init(project=project, id=run_id, resume="allow", name=run_dir.name, dir=str(run_dir), config=config)
