"""`ActivationRows`: activation vectors with the token, document and position each one came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

META_FIELDS = ("token", "doc", "row", "pos")


@dataclass
class ActivationRows:
    """A set of harvested rows, row-aligned across every field.

    The browser and the evaluation layer need to know where each activation came from, so the provenance
    travels with the vectors through harvesting, the shuffle buffer and the on-disk cache.
    """

    acts: dict[str, torch.Tensor]
    """Activations per hook name, each [n, d_in]."""
    token: torch.Tensor
    """Token id at each row's position, [n] int64."""
    doc: torch.Tensor
    """Index of the corpus document the token belongs to, [n] int64 (-1 for separator/BOS tokens)."""
    row: torch.Tensor
    """Global index of the packed context the token sits in, [n] int64."""
    pos: torch.Tensor
    """Position of the token inside its packed context, [n] int64."""
    grads: dict[str, torch.Tensor] | None = field(default=None)
    """∂CE/∂x per hook name, [n, d_in], when gradients were harvested (g-SAE)."""

    def __len__(self) -> int:
        return self.token.shape[0]

    @property
    def hooks(self) -> list[str]:
        return list(self.acts)

    def meta(self) -> dict[str, torch.Tensor]:
        """The provenance fields as a dict."""
        return {name: getattr(self, name) for name in META_FIELDS}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field as one flat dict (`acts/<hook>`, `grads/<hook>`, token, doc, row, pos), e.g. for safetensors."""
        out = {f"acts/{h}": a for h, a in self.acts.items()} | self.meta()
        if self.grads is not None:
            out |= {f"grads/{h}": g for h, g in self.grads.items()}
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> ActivationRows:
        """Inverse of `tensors`."""
        grads = {k.removeprefix("grads/"): v for k, v in tensors.items() if k.startswith("grads/")}
        return ActivationRows(
            acts={k.removeprefix("acts/"): v for k, v in tensors.items() if k.startswith("acts/")},
            grads=grads or None,
            **{name: tensors[name] for name in META_FIELDS},
        )

    def select(self, idx: torch.Tensor | slice) -> ActivationRows:
        """Rows at `idx` (an index tensor, boolean mask or slice)."""
        return ActivationRows(
            acts={h: a[idx] for h, a in self.acts.items()},
            grads=None if self.grads is None else {h: g[idx] for h, g in self.grads.items()},
            **{name: t[idx] for name, t in self.meta().items()},
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ActivationRows:
        """Move to `device`; cast activations and gradients (never the integer fields) to `dtype`."""
        return ActivationRows(
            acts={h: a.to(device=device, dtype=dtype) for h, a in self.acts.items()},
            grads=None if self.grads is None else {h: g.to(device=device, dtype=dtype) for h, g in self.grads.items()},
            **{name: t.to(device=device) for name, t in self.meta().items()},
        )

    @staticmethod
    def cat(parts: list[ActivationRows]) -> ActivationRows:
        """Concatenate row sets that share hooks (and gradients, if any)."""
        if not parts:
            raise ValueError("ActivationRows.cat needs at least one part")
        first = parts[0]
        grads = None
        if first.grads is not None:
            grads = {h: torch.cat([p.grads[h] for p in parts]) for h in first.grads}  # type: ignore[index]
        return ActivationRows(
            acts={h: torch.cat([p.acts[h] for p in parts]) for h in first.acts},
            grads=grads,
            **{name: torch.cat([getattr(p, name) for p in parts]) for name in META_FIELDS},
        )
